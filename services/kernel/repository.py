"""Load and save event-sourced aggregates: the store, the registry and the outbox together."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime

from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import Message

from services.kernel.envelope import EventRegistry, Metadata, wrap
from services.kernel.errors import ConcurrencyConflict
from services.kernel.eventstore import EventStore
from services.kernel.telemetry import current_trace_headers


class Repository:
    def __init__(
        self,
        store: EventStore,
        registry: EventRegistry,
        topic: str,
        aggregate_type: str,
        on_saved: Callable[[], None] = lambda: None,
        cache_size: int = 10_000,
    ) -> None:
        self._store = store
        self._registry = registry
        self._topic = topic
        self._aggregate_type = aggregate_type
        self._on_saved = on_saved  # wakes the outbox relay
        self._cache: OrderedDict[str, list[tuple[Message, datetime]]] = OrderedDict()
        self._cache_size = cache_size
        self._tails: dict[str, tuple[int, Future[None]]] = {}  # aggregate -> (version after, write in flight)
        self._lock = threading.Lock()

    def load(self, aggregate_id: str) -> list[Message]:
        return [message for message, _ in self.history(aggregate_id)]

    def history(self, aggregate_id: str) -> list[tuple[Message, datetime]]:
        """Every event of the aggregate with the time it happened, oldest first.

        Histories are cached per process and extended by this process's own writes;
        another writer's append shows up as a ConcurrencyConflict on save, which
        drops the cached copy, so the retry reads the store again."""
        with self._lock:
            cached = self._cache.get(aggregate_id)
        if cached is None:
            cached = [self._decoded(envelope) for envelope in self._store.load(aggregate_id)]
            with self._lock:
                self._remember(aggregate_id, cached)
        return list(cached)

    def _decoded(self, envelope: EventEnvelope) -> tuple[Message, datetime]:
        return self._registry.decode(envelope), envelope.occurred_at.ToDatetime(tzinfo=UTC)

    def _remember(self, aggregate_id: str, history: list[tuple[Message, datetime]]) -> None:
        self._cache[aggregate_id] = history
        self._cache.move_to_end(aggregate_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def save(
        self,
        aggregate_id: str,
        version: int,
        events: Sequence[Message],
        meta: Metadata,
        occurred_at: datetime | None = None,
    ) -> list[EventEnvelope]:
        """Append `events` after `version` and wait until durable; ConcurrencyConflict if
        the aggregate moved on.  `occurred_at` is the business time (e.g. a CTI timestamp); default now.
        """
        envelopes, future = self.submit(aggregate_id, version, events, meta, occurred_at)
        try:
            future.result()
        except ConcurrencyConflict:
            self._forget(aggregate_id)
            raise
        return envelopes

    def submit(
        self,
        aggregate_id: str,
        version: int,
        events: Sequence[Message],
        meta: Metadata,
        occurred_at: datetime | None = None,
    ) -> tuple[list[EventEnvelope], Future[None]]:
        """Queue the events for the next group commit without waiting.

        The cached history runs ahead at once, so the next decision on this aggregate
        can build on it; a write that builds on one still in flight fails if that one
        does (the store never leaves a gap), and the cache is then dropped."""
        envelopes = [
            wrap(
                event,
                registry=self._registry,
                aggregate_type=self._aggregate_type,
                aggregate_id=aggregate_id,
                sequence=version + offset,
                meta=meta,
                occurred_at=occurred_at,
            )
            for offset, event in enumerate(events, start=1)
        ]
        if not envelopes:
            done: Future[None] = Future()
            done.set_result(None)
            return envelopes, done
        with self._lock:
            tail = self._tails.get(aggregate_id)
            after = tail[1] if tail is not None and tail[0] == version else None
            future = self._store.submit(self._topic, envelopes, current_trace_headers(), after)
            self._tails[aggregate_id] = (version + len(envelopes), future)
            cached = self._cache.get(aggregate_id)
            if cached is not None and len(cached) == version:
                self._remember(aggregate_id, cached + [self._decoded(e) for e in envelopes])
            else:
                self._cache.pop(aggregate_id, None)
        future.add_done_callback(lambda f: self._settled(aggregate_id, f))
        return envelopes, future

    def _settled(self, aggregate_id: str, future: Future[None]) -> None:
        with self._lock:
            tail = self._tails.get(aggregate_id)
            if tail is not None and tail[1] is future:
                del self._tails[aggregate_id]
        if future.exception() is not None:
            self._forget(aggregate_id)
        else:
            self._on_saved()

    def _forget(self, aggregate_id: str) -> None:
        with self._lock:
            self._cache.pop(aggregate_id, None)
