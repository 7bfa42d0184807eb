"""Drains the event store's unpublished events into Kafka, in order, at least once.

The command path only wakes the relay up; if Kafka is down the events wait in
MongoDB and go out when it is back.  Consumers deduplicate by event id and
sequence, so a resend after a crash between send and mark is harmless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from centralino.v1.envelope_pb2 import EventEnvelope
from kafka import KafkaProducer

from services.kernel.envelope import cloudevents_headers
from services.kernel.eventstore import EventStore, StoredEvent
from services.kernel.kafka import Headers, send_all

log = logging.getLogger(__name__)


def to_record(stored: StoredEvent) -> tuple[str, bytes, bytes, Headers]:
    envelope = EventEnvelope.FromString(stored.envelope)
    headers = cloudevents_headers(envelope)
    headers += [(key, value.encode()) for key, value in (stored.trace_headers or {}).items()]
    return stored.topic, envelope.aggregate_id.encode(), stored.envelope, headers


class OutboxRelay:
    def __init__(
        self,
        store: EventStore,
        producer_factory: Callable[[], KafkaProducer],
        interval_s: float = 1.0,
        batch: int = 500,
    ) -> None:
        self._store = store
        # Made on first use: the service accepts commands even while Kafka is down.
        self._producer_factory = producer_factory
        self._producer: KafkaProducer | None = None
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
        except Exception:
            log.exception("outbox relay stopped with events still unpublished; they go out at next start")
        if self._producer is not None:
            self._producer.close(timeout=10)

    def drain_once(self) -> int:
        """Publish every unpublished event; returns how many went out."""
        sent = 0
        while batch := self._store.unpublished(self._batch):
            if self._producer is None:
                self._producer = self._producer_factory()
            send_all(self._producer, [to_record(doc) for doc in batch], timeout_s=30)
            self._store.mark_published([doc.event_id for doc in batch])
            sent += len(batch)
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
