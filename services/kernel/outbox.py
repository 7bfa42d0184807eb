"""Drains the event store's unpublished events into Kafka, in order, at least once.

The command path only wakes the relay up; if Kafka is down the events wait in
MongoDB and go out when it is back.  Consumers deduplicate by event id and
sequence, so a resend after a crash between send and mark is harmless.

Each record's `traceparent` names the request that stored its event (its W3C
context is kept with the event), so the journey's trace continues through Kafka
even though publishing happens after the request has returned.  Each batch sent
is one PRODUCER span, in the first record's trace, linked to the others'.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from centralino.v1.envelope_pb2 import EventEnvelope
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from services.kernel import metrics
from services.kernel.envelope import cloudevents_headers
from services.kernel.eventstore import EventStore, Unpublished
from services.kernel.kafka import KEEP_FOREVER, EventProducer, Headers, ensure_topics, make_producer
from services.kernel.telemetry import context_from_headers

log = logging.getLogger(__name__)

TRACER_NAME = "centralino.outbox"
MAX_LINKS = 128  # the SDK's default span limit: requests past it are not linked


def to_record(stored: Unpublished) -> tuple[str, bytes, bytes, Headers]:
    """The Kafka record of a stored event, carrying the W3C context of the request that stored it."""
    envelope = EventEnvelope.FromString(stored.envelope)
    headers = cloudevents_headers(envelope)
    headers += [(key, value.encode()) for key, value in (stored.trace_headers or {}).items()]
    return stored.topic, envelope.aggregate_id.encode(), stored.envelope, headers


def _links(batch: Sequence[Unpublished]) -> list[Link]:
    """A link to each request whose events the batch carries (once per request)."""
    contexts = {tuple(sorted((stored.trace_headers or {}).items())) for stored in batch}
    links = []
    for headers in sorted(contexts)[:MAX_LINKS]:
        span_context = trace.get_current_span(context_from_headers(dict(headers))).get_span_context()
        if span_context.is_valid:
            links.append(Link(span_context))
    return links


def _span_attributes(topics: Sequence[str], count: int, client_id: str) -> dict[str, str | int]:
    # No message key: it is the aggregate id, and agent ids are people's names.
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.batch.message_count": count,
    }
    if len(topics) == 1:
        attributes["messaging.destination.name"] = topics[0]
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
    """Send a batch, in one PRODUCER span, and wait for every acknowledgement.

    Each record carries the context of the request that stored its event (its creation
    context, in the messaging conventions' words), so the span of whoever consumes it
    continues that request's trace.  The batch's span sits in the first record's trace
    and links to the others' requests: a span per record cost the relays about a sixth
    of the routing service's CPU, spans and their export together."""
    tracer = tracer or trace.get_tracer(TRACER_NAME)
    instruments = instruments or metrics.instruments(metrics.PublishMetrics)
    sent = Counter(stored.topic for stored in batch)
    topics = sorted(sent)
    attributes = {topic: _metric_attributes(topic) for topic in topics}
    span = tracer.start_span(
        f"send {topics[0]}" if len(topics) == 1 else "send",
        context=context_from_headers(batch[0].trace_headers or {}),
        kind=SpanKind.PRODUCER,
        links=_links(batch),
        attributes=_span_attributes(topics, len(batch), producer.client_id),
    )
    try:
        producer.send_all([to_record(stored) for stored in batch], timeout_s=timeout_s)
    except Exception as exc:
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
        span.end()
        for topic, count in sent.items():
            instruments.sent.add(count, {**attributes[topic], "error.type": type(exc).__qualname__})
        raise
    span.end()
    for topic, count in sent.items():
        instruments.sent.add(count, attributes[topic])
    now = datetime.now(UTC)
    for stored in batch:
        recorded_at = stored.recorded_at if stored.recorded_at.tzinfo else stored.recorded_at.replace(tzinfo=UTC)
        instruments.outbox_lag.record(max((now - recorded_at).total_seconds(), 0.0), attributes[stored.topic])


def _metric_attributes(topic: str) -> dict[str, str]:
    return {"messaging.system": "kafka", "messaging.operation.name": "send", "messaging.destination.name": topic}


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


def relay_for(
    store: EventStore, bootstrap: str, topic: str, client_id: str, interval_s: float, retention_ms: int = KEEP_FOREVER
) -> OutboxRelay:
    """The relay of one service: its producer (and topic) are made when Kafka first answers."""

    def producer() -> EventProducer:
        ensure_topics(bootstrap, [topic], retention_ms=retention_ms)
        return make_producer(bootstrap, client_id=client_id)

    return OutboxRelay(store, producer, interval_s=interval_s)
