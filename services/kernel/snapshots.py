"""Snapshots: an aggregate's folded state, saved now and then beside its events.

An aggregate read by a process that has not folded it yet (after a restart, or once
evicted from memory) starts from its latest snapshot and reads only the events after
it, not its whole history: an agent's grows by four events per interaction, every
working day, and the event store is read one `_id` at a time (FerretDB v1 on SQLite
pushes down nothing else).

A snapshot is a cache, never the truth: it is taken from committed events only,
written on a thread of its own after the fact (no command waits for it, and one lost
in a crash costs only a longer read), and kept only if newer than the one stored.
Each kind of aggregate names a `format`: a snapshot of another format (an older
release's state, or one folded by older rules) is ignored and the aggregate is folded
from its events, which are what decides.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from pymongo.errors import DuplicateKeyError

from services.kernel.eventstore import collection

log = logging.getLogger(__name__)

SNAPSHOTS_COLLECTION = "snapshots"


@dataclass(frozen=True)
class Snapshot:
    version: int  # the sequence of the last event folded in
    state: dict[str, Any]


class SnapshotStore:
    """The snapshots of one kind of aggregate (e.g. "agents.Agent"), in the events database."""

    def __init__(self, kind: str, format: int) -> None:
        self.kind = kind
        self.format = format
        self._pending: dict[str, Snapshot] = {}  # aggregate -> newest not yet written
        self._ready = threading.Condition()
        self._writing = 0
        self._thread: threading.Thread | None = None

    def _key(self, aggregate_id: str) -> str:
        return f"{self.kind}:{aggregate_id}"

    def load(self, aggregate_id: str) -> Snapshot | None:
        doc = collection(SNAPSHOTS_COLLECTION).find_one({"_id": self._key(aggregate_id)})
        if doc is None or doc.get("format") != self.format:
            return None
        return Snapshot(int(doc["version"]), dict(doc["state"]))

    def save(self, aggregate_id: str, snapshot: Snapshot) -> None:
        """Write now, unless the stored one is as new or newer."""
        key = self._key(aggregate_id)
        document = {"version": snapshot.version, "format": self.format, "state": snapshot.state}
        stored_older = {"$or": [{"version": {"$lt": snapshot.version}}, {"format": {"$ne": self.format}}]}
        # A duplicate key: one as new or newer is stored, so the filter matched nothing.
        with contextlib.suppress(DuplicateKeyError):
            collection(SNAPSHOTS_COLLECTION).update_one({"_id": key, **stored_older}, {"$set": document}, upsert=True)

    def save_later(self, aggregate_id: str, snapshot: Snapshot) -> None:
        """Queue for the writer thread; only the newest queued per aggregate is written."""
        with self._ready:
            if self._thread is None:  # started on first use: nothing runs at construction
                self._thread = threading.Thread(target=self._run, name=f"snapshots-{self.kind}", daemon=True)
                self._thread.start()
            queued = self._pending.get(aggregate_id)
            if queued is None or queued.version < snapshot.version:
                self._pending[aggregate_id] = snapshot
            self._ready.notify()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued snapshot is written (or given up); False on timeout."""
        with self._ready:
            return self._ready.wait_for(lambda: not self._pending and not self._writing, timeout_s)

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._pending))
                batch, self._pending = self._pending, {}
                self._writing = len(batch)
            for aggregate_id, snapshot in batch.items():
                try:
                    self.save(aggregate_id, snapshot)
                except Exception:  # a database outage: the events still hold everything
                    log.warning("could not save the snapshot of %s %s", self.kind, aggregate_id, exc_info=True)
            with self._ready:
                self._writing = 0
                self._ready.notify_all()
