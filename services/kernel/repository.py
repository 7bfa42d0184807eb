"""Load and save event-sourced aggregates: the store, the registry and the outbox together."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import NamedTuple

from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import Message

from services.kernel.envelope import EventRegistry, Metadata, wrap
from services.kernel.eventstore import EventStore
from services.kernel.telemetry import current_trace_headers

History = list[tuple[Message, datetime]]
KEEP_EVENTS = 64  # per cached aggregate: the newest ones, enough to catch up a folded state


class _Cached(NamedTuple):
    """The newest events of an aggregate: versions base + 1 ... base + len(events)."""

    base: int
    events: History

    @property
    def version(self) -> int:
        return self.base + len(self.events)


class Repository:
    """Histories are cached per process, newest events only (`keep_events` per aggregate):
    a caller that keeps its aggregates folded (the agents application) asks for what
    came after the version it holds (`since`), and neither memory nor the work per
    command grows with an aggregate's years of history.  A full `history` of an
    aggregate whose cached events no longer start at its first is read from the store."""

    def __init__(
        self,
        store: EventStore,
        registry: EventRegistry,
        topic: str,
        aggregate_type: str,
        on_saved: Callable[[], None] = lambda: None,
        cache_size: int = 10_000,
        keep_events: int = KEEP_EVENTS,
    ) -> None:
        self._store = store
        self._registry = registry
        self._topic = topic
        self._aggregate_type = aggregate_type
        self._on_saved = on_saved  # wakes the outbox relay
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._keep = keep_events
        self._tails: dict[str, tuple[int, Future[None]]] = {}  # aggregate -> (version after, write in flight)
        self._lock = threading.Lock()

    @property
    def store(self) -> EventStore:
        return self._store

    def load(self, aggregate_id: str) -> list[Message]:
        return [message for message, _ in self.history(aggregate_id)]

    def stored(self, aggregate_id: str) -> list[EventEnvelope]:
        """The aggregate's events as stored, envelopes and all (read from the store)."""
        return self._store.load(aggregate_id)

    def history(self, aggregate_id: str) -> History:
        """Every event of the aggregate with the time it happened, oldest first.

        Cached per process and extended by this process's own writes; another writer's
        append shows up as a ConcurrencyConflict on save, which drops the cached copy,
        so the retry reads the store again."""
        with self._lock:
            cached = self._cache.get(aggregate_id)
        if cached is not None and cached.base == 0:
            return list(cached.events)
        return self._load(aggregate_id)

    def since(self, aggregate_id: str, version: int) -> History | None:
        """The aggregate's events after `version`, oldest first; None if the store does
        not reach `version` (the caller's state is not this aggregate's)."""
        with self._lock:
            cached = self._cache.get(aggregate_id)
        if cached is not None and cached.base <= version <= cached.version:
            return cached.events[version - cached.base :]
        envelopes = self._store.load_after(aggregate_id, version)
        if envelopes is None:
            return None
        events = [self._decoded(envelope) for envelope in envelopes]
        with self._lock:
            self._remember(aggregate_id, _Cached(version, events))
        return list(events)

    def _load(self, aggregate_id: str) -> History:
        history = [self._decoded(envelope) for envelope in self._store.load(aggregate_id)]
        with self._lock:
            self._remember(aggregate_id, _Cached(0, history))
        return history

    def _decoded(self, envelope: EventEnvelope) -> tuple[Message, datetime]:
        return self._registry.decode(envelope), envelope.occurred_at.ToDatetime(tzinfo=UTC)

    def _remember(self, aggregate_id: str, cached: _Cached) -> None:
        if len(cached.events) > self._keep:
            dropped = len(cached.events) - self._keep
            cached = _Cached(cached.base + dropped, cached.events[dropped:])
        self._cache[aggregate_id] = cached
        self._cache.move_to_end(aggregate_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def save(
        self,
        aggregate_id: str,
        version: int,
        events: Sequence[Message],
        meta: Metadata | Sequence[Metadata],
        occurred_at: datetime | Sequence[datetime | None] | None = None,
    ) -> list[EventEnvelope]:
        """Append `events` after `version` and wait until durable; ConcurrencyConflict if
        the aggregate moved on.  `occurred_at` is the business time (e.g. a CTI timestamp); default now.
        """
        envelopes, future = self.submit(aggregate_id, version, events, meta, occurred_at)
        future.result()
        return envelopes

    def submit(
        self,
        aggregate_id: str,
        version: int,
        events: Sequence[Message],
        meta: Metadata | Sequence[Metadata],
        occurred_at: datetime | Sequence[datetime | None] | None = None,
    ) -> tuple[list[EventEnvelope], Future[None]]:
        """Queue the events for the next group commit without waiting; `meta` and
        `occurred_at` may be given per event.

        The cached history only ever holds committed events, so a decision read from
        it never builds on a write that may still fail.  A caller that keeps its own
        state ahead of the store (the router) may write again before the last write
        is durable: a write made on the version another write in flight leads to
        fails if that one does, so the store never holds a gap."""
        metas = [meta] * len(events) if isinstance(meta, Metadata) else list(meta)
        times = list(occurred_at) if isinstance(occurred_at, Sequence) else [occurred_at] * len(events)
        envelopes = [
            wrap(
                event,
                registry=self._registry,
                aggregate_type=self._aggregate_type,
                aggregate_id=aggregate_id,
                sequence=version + offset,
                meta=metas[offset - 1],
                occurred_at=times[offset - 1],
            )
            for offset, event in enumerate(events, start=1)
        ]
        done: Future[None] = Future()
        if not envelopes:
            done.set_result(None)
            return envelopes, done
        with self._lock:
            tail = self._tails.get(aggregate_id)
            after = tail[1] if tail is not None and tail[0] == version else None
            stored = self._store.submit(self._topic, envelopes, current_trace_headers(), after)
            self._tails[aggregate_id] = (version + len(envelopes), done)
        stored.add_done_callback(lambda f: self._settled(aggregate_id, version, envelopes, f, done))
        return envelopes, done

    def _settled(
        self, aggregate_id: str, version: int, envelopes: list[EventEnvelope], stored: Future[None], done: Future[None]
    ) -> None:
        # The cache is brought up to date before the caller wakes: its next read sees the write.
        failure = stored.exception()
        with self._lock:
            tail = self._tails.get(aggregate_id)
            if tail is not None and tail[1] is done:
                del self._tails[aggregate_id]
            cached = self._cache.get(aggregate_id)
            if failure is None and cached is not None and cached.version == version:
                self._remember(
                    aggregate_id, _Cached(cached.base, cached.events + [self._decoded(e) for e in envelopes])
                )
            else:
                self._cache.pop(aggregate_id, None)
        if failure is None:
            self._on_saved()
            done.set_result(None)
        else:
            done.set_exception(failure)
