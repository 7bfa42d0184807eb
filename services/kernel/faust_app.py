"""Faust application factory and the envelope-consuming agents projections use (one event at a time, or batches)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import faust
import faust.types
from centralino.v1.envelope_pb2 import EventEnvelope
from faust.streams import _current_event as _faust_current_event
from faust.types import TP
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.kernel import logs, metrics
from services.kernel.config import Settings
from services.kernel.dead_letters import DeadLetters
from services.kernel.envelope import UnknownEventType, read_envelope
from services.kernel.telemetry import context_from_headers

log = logging.getLogger(__name__)

EnvelopeHandler = Callable[[EventEnvelope], object]
NOT_AN_ENVELOPE = "not an event envelope"
# How often an idle or stuck consumer re-reads its partitions' high watermarks.
LAG_REFRESH_S = 5.0
_LAGS: weakref.WeakKeyDictionary[faust.App, metrics.ConsumerLag] = weakref.WeakKeyDictionary()
_DEAD_LETTERS: weakref.WeakKeyDictionary[faust.App, DeadLetters] = weakref.WeakKeyDictionary()


def create_app(name: str, settings: Settings) -> faust.App:
    datadir = settings.state_dir / "faust" / settings.consumer_group(name)
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    # `version` is part of every changelog topic and state path: never bump it casually.
    app = faust.App(
        settings.consumer_group(name),
        version=1,
        broker=";".join(f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")),
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=3,
        topic_replication_factor=1,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        autodiscover=False,
        # The worker resets logging when it starts; this keeps our structured handler.
        **logs.faust_logging(),
    )
    _watch_consumer_lag(app)
    _DEAD_LETTERS[app] = DeadLetters(settings.kafka_bootstrap, app.conf.id)
    return app


async def _park(app: faust.App, event: faust.EventT, reason: str) -> None:
    """Keep a record the consumer skips in its dead-letter topic, before moving past it."""
    dead_letters = _DEAD_LETTERS.get(app)
    if dead_letters is None:  # an app not made by create_app
        return
    message = event.message
    raw = message.headers or []
    pairs = raw.items() if isinstance(raw, Mapping) else raw
    headers = [(str(name), value if isinstance(value, bytes) else str(value).encode()) for name, value in pairs]
    await asyncio.to_thread(dead_letters.park, *_place(event), message.key, message.value, headers, reason)


def _watch_consumer_lag(app: faust.App) -> None:
    """Report `centralino.kafka.consumer.lag` for every partition the app is assigned.

    Updated as events are processed (see `envelope_agent`) and, so that an idle
    or stuck consumer still reports a growing lag, on a timer.
    """
    lag = metrics.ConsumerLag(app.conf.id)
    _LAGS[app] = lag
    metrics.CONSUMER_LAG.add(lag.observe)

    @app.timer(LAG_REFRESH_S, name=f"{app.conf.id}.consumer-lag")
    async def refresh() -> None:
        assigned = app.consumer.assignment()
        highwaters = await app.consumer.highwaters(*assigned) if assigned else {}
        lag.refreshed(
            {(tp.topic, tp.partition): (highwaters.get(tp), await app.consumer.position(tp)) for tp in assigned}
        )


def _highwater(app: faust.App, tp: TP) -> int | None:
    try:
        return app.consumer.highwater(tp)
    except Exception:  # not assigned any more (a rebalance): the timer catches up
        return None


def envelope_agent(app: faust.App, topic_name: str, name: str, handle: EnvelopeHandler) -> None:
    """Register a Faust agent that feeds each envelope of `topic_name` to `handle`.

    A plain handler runs in a worker thread (mongoengine is blocking); a coroutine
    handler runs on the loop (to use Faust tables) and offloads its own blocking
    work.  Either runs inside a CONSUMER
    span whose parent is the PRODUCER span named in the record headers, so its
    MongoDB writes appear as that span's children in the journey's trace.
    """
    topic, tracer, instruments, lag, common = _consuming(app, topic_name, name)

    async def consume(stream: faust.StreamT) -> None:
        async for event in stream.events():
            envelope = read_envelope(event.value, *_place(event))
            if envelope is None:
                await _park(app, event, NOT_AN_ENVELOPE)
                continue
            message = event.message
            started = time.perf_counter()
            with tracer.start_as_current_span(
                f"process {topic_name}",
                context=context_from_headers(event.headers or {}),
                kind=SpanKind.CONSUMER,
                attributes=_process_attributes(common, envelope, message),
            ) as span:
                outcome = await _handle_with_retry(handle, envelope)
                if outcome:
                    span.set_attribute("error.type", outcome)
                    span.set_status(Status(StatusCode.ERROR, outcome))
                    await _park(app, event, f"unknown event type {envelope.event_type}")
            measured = {**common, **({"error.type": outcome} if outcome else {})}
            instruments.consumed.add(1, measured)
            instruments.process_duration.record(time.perf_counter() - started, measured)
            if not outcome:
                occurred = envelope.occurred_at.ToDatetime(tzinfo=UTC)
                instruments.projection_lag.record(max((datetime.now(UTC) - occurred).total_seconds(), 0.0), common)
            if lag is not None:
                lag.processed(message.topic, message.partition, message.offset + 1, _highwater(app, message.tp))

    app.agent(topic, name=name)(consume)


@dataclass(eq=False)
class Record:
    """One record of a batch: its envelope, its decoded payload, the CONSUMER span that
    stands for its processing and the Faust event it came in (None outside Faust)."""

    envelope: EventEnvelope
    span: trace.Span = trace.INVALID_SPAN
    event: faust.types.EventT | None = None
    payload: Message | None = None
    skipped: str = ""  # why it was skipped; "" if applied

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """Inside, this record is the one being processed, as in a one-at-a-time agent: its
        CONSUMER span is the current span (MongoDB calls, in this task or in a thread
        started here, become its children) and Faust tables written to send their
        changelog to its partition."""
        token = _faust_current_event.set(weakref.ref(self.event)) if self.event is not None else None
        try:
            with trace.use_span(self.span, end_on_exit=False):
                yield
        finally:
            if token is not None:
                _faust_current_event.reset(token)


BatchHandler = Callable[[Sequence[Record]], Awaitable[None]]
Decoder = Callable[[EventEnvelope], Message]


def envelope_batch_agent(
    app: faust.App,
    topic_name: str,
    name: str,
    decode: Decoder,
    handle: BatchHandler,
    *,
    max_records: int = 500,
    within_s: float = 0.05,
) -> None:
    """Register a Faust agent that feeds `topic_name` to `handle` in batches of up to
    `max_records` records gathered for up to `within_s` seconds (`Stream.take_events`),
    so a handler can fold many events in memory and write each read-model document once.

    Every record keeps a CONSUMER span of its own, whose parent is the PRODUCER span
    named in its headers (the handler issues each write inside the span of the record
    it stands for: `Record.current`), and its own metrics.  Payloads are decoded here:
    an unknown event type is skipped with a warning and never reaches the handler.
    Anything the handler raises (a database outage...) retries the whole batch, forever,
    so the handler must be idempotent: a batch is acknowledged only once handled.
    """
    topic, tracer, instruments, lag, common = _consuming(app, topic_name, name)

    async def consume(stream: faust.StreamT) -> None:
        # take_events (not take): the handler needs each record's headers and offset, not only its value.
        async for events in cast(faust.Stream, stream).take_events(max_records, within=within_s):
            started = time.perf_counter()
            records = []
            batch = {"messaging.batch.message_count": len(events)}
            for event in events:
                envelope = read_envelope(event.value, *_place(event))
                if envelope is None:
                    await _park(app, event, NOT_AN_ENVELOPE)
                    continue
                attributes = {**_process_attributes(common, envelope, event.message), **batch}
                span = tracer.start_span(
                    f"process {topic_name}",
                    context=context_from_headers(event.headers or {}),
                    kind=SpanKind.CONSUMER,
                    attributes=attributes,
                )
                records.append(Record(envelope, span, event))
            try:
                await _handle_batch_with_retry(decode, handle, records)
            except BaseException:  # stopped (cancelled) before the batch was handled: not counted
                for record in records:
                    record.span.end()
                raise
            for record in records:
                if record.skipped and record.event is not None:
                    await _park(app, record.event, f"unknown event type {record.envelope.event_type}")
            _finish(records, instruments, common, time.perf_counter() - started)
            if lag is not None:
                ends: dict[TP, int] = {}
                for event in events:
                    ends[event.message.tp] = max(ends.get(event.message.tp, 0), event.message.offset + 1)
                for tp, end in ends.items():
                    lag.processed(tp.topic, tp.partition, end, _highwater(app, tp))

    app.agent(topic, name=name)(consume)


def _place(event: faust.EventT) -> tuple[str, int, int]:
    return event.message.topic, event.message.partition, event.message.offset


def _consuming(
    app: faust.App, topic_name: str, name: str
) -> tuple[faust.TopicT, trace.Tracer, metrics.ProjectionMetrics, metrics.ConsumerLag | None, dict[str, str]]:
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    lag = _LAGS.get(app)
    if lag is not None:
        lag.topics.add(topic_name)
    common = {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.destination.name": topic_name,
        "messaging.consumer.group.name": app.conf.id,
        "centralino.projection.name": name,
    }
    tracer = trace.get_tracer(f"centralino.projections.{name}")
    return topic, tracer, metrics.instruments(metrics.ProjectionMetrics), lag, common


def _process_attributes(
    common: dict[str, str], envelope: EventEnvelope, message: faust.types.Message
) -> dict[str, Any]:
    return {
        **common,
        "messaging.operation.type": "process",
        "messaging.message.id": envelope.event_id,
        "messaging.destination.partition.id": str(message.partition),
        "messaging.kafka.offset": message.offset,
        "cloudevents.event_id": envelope.event_id,
        "cloudevents.event_type": envelope.event_type,
        "cloudevents.event_source": envelope.producer,
    }


def _finish(
    records: Sequence[Record], instruments: metrics.ProjectionMetrics, common: dict[str, str], duration_s: float
) -> None:
    """End every record's span and count it.  Each record's processing is its batch's, so
    `messaging.process.duration` records the batch's duration once per record."""
    now = datetime.now(UTC)
    for record in records:
        outcome = record.skipped
        if outcome:
            record.span.set_attribute("error.type", outcome)
            record.span.set_status(Status(StatusCode.ERROR, outcome))
        record.span.end()
        measured = {**common, **({"error.type": outcome} if outcome else {})}
        instruments.consumed.add(1, measured)
        instruments.process_duration.record(duration_s, measured)
        if not outcome:
            occurred = record.envelope.occurred_at.ToDatetime(tzinfo=UTC)
            instruments.projection_lag.record(max((now - occurred).total_seconds(), 0.0), common)


async def _handle_batch_with_retry(decode: Decoder, handle: BatchHandler, records: Sequence[Record]) -> None:
    """Retry database outages forever (nothing may be skipped); skip only what no retry can fix."""
    delay = 0.5
    while True:
        try:
            for record in records:
                if record.payload is None and not record.skipped:
                    try:
                        record.payload = decode(record.envelope)
                    except UnknownEventType:
                        log.warning(
                            "skipping event %s of unknown type %s", record.envelope.event_id, record.envelope.event_type
                        )
                        record.skipped = UnknownEventType.__name__
            await handle([record for record in records if not record.skipped])
            return
        except Exception:
            # As `_handle_with_retry`: retried, never skipped; a stuck partition shows in the lag.
            first = records[0].envelope.event_id if records else ""
            log.exception(
                "projection failed for a batch of %d events (from %s); retrying in %.1fs", len(records), first, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _handle_with_retry(handle: EnvelopeHandler, envelope: EventEnvelope) -> str:
    """Retry database outages forever (nothing may be skipped); skip only what no retry can fix.

    Returns "" when handled, else why the event was skipped.
    """
    delay = 0.5
    while True:
        try:
            if inspect.iscoroutinefunction(handle):
                await handle(envelope)  # async handlers use Faust tables on the loop themselves
            else:
                await asyncio.to_thread(handle, envelope)
            return ""
        except UnknownEventType:
            log.warning("skipping event %s of unknown type %s", envelope.event_id, envelope.event_type)
            return UnknownEventType.__name__
        except Exception:
            # Anything else (database outage, a bug fixed by a redeploy) is retried, never
            # skipped: moving on would lose the event, while a stuck partition shows in the lag.
            log.exception("projection failed for event %s; retrying in %.1fs", envelope.event_id, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
