"""Load and save event-sourced aggregates: the store, the registry and the outbox together."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
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

    def load(self, aggregate_id: str) -> list[Message]:
        return [message for message, _ in self.history(aggregate_id)]

    def history(self, aggregate_id: str) -> list[tuple[Message, datetime]]:
        """Every event of the aggregate with the time it happened, oldest first.

        Histories are cached per process and extended by this process's own saves;
        another writer's append shows up as a ConcurrencyConflict on save, which
        drops the cached copy, so the retry reads the store again."""
        cached = self._cache.get(aggregate_id)
        if cached is None:
            cached = [self._decoded(envelope) for envelope in self._store.load(aggregate_id)]
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
        """Append `events` after `version`; ConcurrencyConflict if the aggregate moved on.

        `occurred_at` is the business time (e.g. a CTI timestamp); default now.
        """
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
        if envelopes:
            try:
                self._store.append(self._topic, envelopes, current_trace_headers())
            except ConcurrencyConflict:
                self._cache.pop(aggregate_id, None)
                raise
            cached = self._cache.get(aggregate_id)
            if cached is not None and len(cached) == version:
                self._remember(aggregate_id, cached + [self._decoded(e) for e in envelopes])
            else:
                self._cache.pop(aggregate_id, None)
            self._on_saved()
        return envelopes
