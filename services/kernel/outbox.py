"""Drains the event store's unpublished events into Kafka, in order, at least once.

The command path only wakes the relay up; if Kafka is down the events wait in
MongoDB and go out when it is back.  Consumers deduplicate by event id and
sequence, so a resend after a crash between send and mark is harmless.

Each record gets a PRODUCER span, child of the request that stored the event
(its W3C context is kept with the event), and the record's `traceparent` names
that span: the journey's trace continues through Kafka even though publishing
happens after the request has returned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from centralino.v1.envelope_pb2 import EventEnvelope
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.kernel import metrics
from services.kernel.envelope import cloudevents_headers
from services.kernel.eventstore import EventStore, Unpublished
from services.kernel.kafka import EventProducer, Headers, ensure_topics, make_producer
from services.kernel.telemetry import context_from_headers, headers_for

log = logging.getLogger(__name__)

TRACER_NAME = "centralino.outbox"


def to_record(stored: Unpublished, trace_headers: Mapping[str, str] | None = None) -> tuple[str, bytes, bytes, Headers]:
    """The Kafka record of a stored event; `trace_headers` (default: the request's) name its parent span."""
    envelope = EventEnvelope.FromString(stored.envelope)
    headers = cloudevents_headers(envelope)
    chosen = (stored.trace_headers or {}) if trace_headers is None else trace_headers
    headers += [(key, value.encode()) for key, value in chosen.items()]
    return stored.topic, envelope.aggregate_id.encode(), stored.envelope, headers


def _span_attributes(stored: Unpublished, envelope: EventEnvelope, client_id: str) -> dict[str, str]:
    # No message key: it is the aggregate id, and agent ids are people's names.
    attributes = {
        "messaging.system": "kafka",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": stored.topic,
        "messaging.message.id": envelope.event_id,
        "cloudevents.event_id": envelope.event_id,
        "cloudevents.event_type": envelope.event_type,
        "cloudevents.event_source": envelope.producer,
    }
    if client_id:
        attributes["messaging.client.id"] = client_id
    return attributes


def publish(
    producer: EventProducer,
    batch: Sequence[Unpublished],
    timeout_s: float,
    tracer: trace.Tracer | None = None,
    instruments: metrics.PublishMetrics | None = None,
) -> None:
    """Send a batch, one PRODUCER span per record, and wait for every acknowledgement."""
    tracer = tracer or trace.get_tracer(TRACER_NAME)
    instruments = instruments or metrics.instruments(metrics.PublishMetrics)
    client_id = producer.client_id
    spans = []
    records = []
    for stored in batch:
        envelope = EventEnvelope.FromString(stored.envelope)
        span = tracer.start_span(
            f"send {stored.topic}",
            context=context_from_headers(stored.trace_headers or {}),
            kind=SpanKind.PRODUCER,
            attributes=_span_attributes(stored, envelope, client_id),
        )
        spans.append(span)
        records.append(to_record(stored, headers_for(span)))
    try:
        landed = producer.send_all(records, timeout_s=timeout_s)
    except Exception as exc:
        for span, stored in zip(spans, batch, strict=True):
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
            span.end()
            instruments.sent.add(
                1,
                {
                    "messaging.system": "kafka",
                    "messaging.operation.name": "send",
                    "messaging.destination.name": stored.topic,
                    "error.type": type(exc).__qualname__,
                },
            )
        raise
    now = datetime.now(UTC)
    for span, stored, where in zip(spans, batch, landed, strict=True):
        span.set_attributes(
            {"messaging.destination.partition.id": str(where.partition), "messaging.kafka.offset": where.offset}
        )
        span.end()
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.name": "send",
            "messaging.destination.name": stored.topic,
        }
        instruments.sent.add(1, attributes)
        recorded_at = stored.recorded_at if stored.recorded_at.tzinfo else stored.recorded_at.replace(tzinfo=UTC)
        instruments.outbox_lag.record(max((now - recorded_at).total_seconds(), 0.0), attributes)


class OutboxRelay:
    def __init__(
        self,
        store: EventStore,
        producer_factory: Callable[[], EventProducer],
        interval_s: float = 1.0,
        batch: int = 500,
    ) -> None:
        self._store = store
        # Made on first use: the service accepts commands even while Kafka is down.
        self._producer_factory = producer_factory
        self._producer: EventProducer | None = None
        self._interval_s = interval_s
        self._batch = batch
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=15)
        try:
            self.drain_once()  # publish what the last requests accepted, if the broker is there
            self._store.mark_published(self._store.unpublished(0)[1], force=True)
        except Exception:
            log.exception("outbox relay stopped with events still unpublished; they go out at next start")
        if self._producer is not None:
            self._producer.close(timeout_s=10)

    def drain_once(self) -> int:
        """Publish every unpublished event; returns how many went out."""
        sent = 0
        while True:
            batch, position = self._store.unpublished(self._batch)
            if batch:
                if self._producer is None:
                    self._producer = self._producer_factory()
                publish(self._producer, batch, timeout_s=30)
            self._store.mark_published(position)
            sent += len(batch)
            if len(batch) < self._batch:
                return sent

    def _run(self) -> None:
        backoff = self._interval_s
        while not self._stopping.is_set():
            self._wake.wait(timeout=backoff)
            self._wake.clear()
            try:
                self.drain_once()
                backoff = self._interval_s
            except Exception:  # broker or database outage: keep the events, retry later
                log.exception("outbox relay could not publish; retrying in %.1fs", backoff)
                backoff = min(backoff * 2, 30.0)


def relay_for(store: EventStore, bootstrap: str, topic: str, client_id: str, interval_s: float) -> OutboxRelay:
    """The relay of one service: its producer (and topic) are made when Kafka first answers."""

    def producer() -> EventProducer:
        ensure_topics(bootstrap, [topic])
        return make_producer(bootstrap, client_id=client_id)

    return OutboxRelay(store, producer, interval_s=interval_s)
