"""OpenTelemetry setup and W3C trace context carried in Kafka record headers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger(__name__)


def setup_tracing(service_name: str) -> TracerProvider:
    """Install a tracer provider; the exporter follows the standard OTEL_TRACES_EXPORTER.

    Spans (and so trace ids) exist even with no exporter, which is what lets the
    trace id travel through Kafka into read models on a laptop with no collector.
    """
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter_name not in ("none", ""):
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported here; traces are not exported", exporter_name)
    trace.set_tracer_provider(provider)
    return provider


def current_trace_headers() -> dict[str, str]:
    """The active span's context as W3C `traceparent`/`tracestate` entries."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from_headers(headers: Iterable[tuple[str, bytes]] | dict[str, bytes]) -> otel_context.Context:
    items = headers.items() if isinstance(headers, dict) else headers
    carrier = {key: value.decode() if isinstance(value, bytes) else value for key, value in items}
    return propagate.extract(carrier)


def trace_id_hex(span: trace.Span | None = None) -> str:
    span_context = (span or trace.get_current_span()).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
