"""Structured logs: one JSON object per line, carrying the trace and span of the work.

SRE jumps from a log line to its trace (and back) by `trace_id`; the ids are read
from the active OpenTelemetry span when the record is made, so every library's
log lines get them, not only ours.  `text` format is the same information for a
human at a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

# The attributes every LogRecord has; anything else was passed with `extra=` and is kept.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _ids() -> tuple[str, str]:
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return "", ""
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """Field names follow OpenTelemetry's log data model where it has one."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self._service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        trace_id, span_id = _ids()
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service.name": self._service_name,
        }
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = span_id
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception.type"] = record.exc_info[0].__name__ if record.exc_info[0] else ""
            entry["exception.stacktrace"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception.stacktrace"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, service_name: str) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        trace_id, span_id = _ids()
        line = super().format(record)
        return f"{line} [trace_id={trace_id} span_id={span_id}]" if trace_id else line


# --------------------------------------------------------------------------- #
# Exporter noise: the OpenTelemetry exporters log every retry of every failed
# export.  While one of our exporters runs an export, what they log on that
# thread is held back and handed to it; it decides what, once, reaches the log.
# --------------------------------------------------------------------------- #

_held = threading.local()


@contextmanager
def hold_sdk_logs() -> Iterator[list[logging.LogRecord]]:
    """Collect (instead of emitting) `opentelemetry.*` records logged on this thread."""
    previous = getattr(_held, "records", None)
    records: list[logging.LogRecord] = []
    _held.records = records
    try:
        yield records
    finally:
        _held.records = previous


class _HoldSdkLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        records = getattr(_held, "records", None)
        if records is not None and record.name.startswith("opentelemetry."):
            records.append(record)
            return False
        return True


class CentralinoHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one root handler every process of ours logs through (Faust workers too)."""


def make_handler(service_name: str, fmt: str = "json", stream: Any = None) -> CentralinoHandler:
    # The stream is bound now: Faust later swaps sys.stdout/sys.stderr for loggers
    # of its own, and writing to those from a log handler would loop.
    handler = CentralinoHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(TextFormatter(service_name) if fmt == "text" else JsonFormatter(service_name))
    handler.addFilter(_HoldSdkLogs())
    return handler


def configure_logging(service_name: str, level: str = "INFO", fmt: str = "json") -> CentralinoHandler:
    """Replace the root handlers (a `basicConfig` made earlier included) with ours."""
    handler = make_handler(service_name, fmt)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return handler


def installed_handlers() -> list[logging.Handler]:
    return [handler for handler in logging.root.handlers if isinstance(handler, CentralinoHandler)]


def faust_logging(level: int | str | None = None) -> dict[str, Any]:
    """Settings that make a Faust worker keep logging through our handler.

    A worker resets logging when it starts (root handlers cleared, then a
    dictConfig); an empty root config plus our handler as a `loghandler` leaves
    exactly our handler in place.  Empty if logging was not configured by us.
    """
    handlers = installed_handlers()
    if not handlers:
        return {}
    config = {
        "version": 1,
        "disable_existing_loggers": False,  # module loggers made at import must keep working
        "root": {"level": level if level is not None else logging.root.level, "handlers": []},
    }
    return {"logging_config": config, "loghandlers": handlers}
