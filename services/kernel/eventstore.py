"""Event store with group commit and a commit log that is its outbox, in MongoDB.

An accepted command is durable once its events are in `event_store`.  Each event
document's `_id` is "<aggregate id>#<sequence>", so the primary key is the
optimistic-concurrency check and every read is a lookup by `_id`: FerretDB v1 on
SQLite pushes down nothing else and would scan the whole collection otherwise.

Group commit: callers `submit` writes and wait on a future; one committer thread
takes everything queued and commits it together, usually in one ordered insert:

1. first an *intent*, "~<log>#<n>", holding every event of the batch (one binary
   `CommitBatch`): what the relay will publish, in order;
2. then each aggregate's first event of the batch (these decide the races);
3. then the aggregates' following events.

An ordered insert stops at the first key already taken, so no event lands without
its intent, nor after a race its aggregate lost; the rare insert that stops early
goes on with what is left (`_insert_events`).  The intent shares the events'
collection so that the whole batch is one round trip, and on FerretDB one
transaction.  Intents written before that, in `event_commits`, are still read.

The committer then hands the accepted events to the relay in memory, so in steady
state the relay reads nothing back.  There are no multi-document transactions
(FerretDB v1), hence the intent: after a crash, the intents the relay had not
passed are settled from the store (an event of the intent that is in the store
under its own event id was accepted, any other was not).  No event is published
that was not accepted, none accepted is left unpublished.

Each service writes its own log (one writer process per log; a second one is
caught by the intent's `_id` and takes the next number).  The relay's position
is saved at most every POSITION_EVERY_S: after a crash it resends from there,
and consumers drop what they have seen (event id and sequence).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import mongoengine as me
from centralino.v1.envelope_pb2 import CommitBatch, CommittedEvent, EventEnvelope
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanKind
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, ServerSelectionTimeoutError

from services.kernel.errors import ConcurrencyConflict

log = logging.getLogger(__name__)

_DUPLICATE_KEY = 11000
MAX_BATCH_EVENTS = 1000
POSITION_EVERY_S = 1.0
# FerretDB v1 inserts up to 100 documents in one transaction (its --test-batch-size), and
# an ordered insert of more goes on past a duplicate key: a bigger commit writes its
# intent alone first, then the events.
ONE_INSERT_MAX_DOCS = 100


def event_key(aggregate_id: str, sequence: int) -> str:
    # Fixed width: (aggregate id, sequence) -> key is one-to-one whatever the id contains.
    return f"{aggregate_id}#{sequence:012d}"


def commit_key(log_name: str, number: int) -> str:
    # "~" starts no aggregate id, so an intent's key is never an event's.
    return f"~{log_name}#{number:015d}"


def legacy_commit_key(log_name: str, number: int) -> str:
    return f"{log_name}#{number:015d}"


EVENTS_COLLECTION = "event_store"
LEGACY_COMMITS_COLLECTION = "event_commits"  # where intents were kept before they joined the events
TRACER_NAME = "centralino.eventstore"


class StoredEvent(me.Document):
    key = me.StringField(primary_key=True)  # event_key(aggregate_id, sequence)
    event_id = me.StringField(required=True)
    aggregate_id = me.StringField(required=True)
    sequence = me.IntField(required=True)
    event_type = me.StringField(required=True)
    topic = me.StringField(required=True)
    envelope = me.BinaryField(required=True)
    trace_headers = me.DictField()  # W3C context of the request that produced it
    recorded_at = me.DateTimeField(required=True)

    meta: dict[str, Any] = {
        "collection": EVENTS_COLLECTION,
        "db_alias": "events",  # services.kernel.mongo.EVENTS_ALIAS
        "auto_create_index": False,
        # For a real MongoDB: a router folding its whole topic at start-up.
        "indexes": [{"fields": ["topic", "aggregate_id", "sequence"]}],
    }


def collection(name: str) -> Collection:
    """A collection of the events database (the event store's, snapshots, checkpoints)."""
    return StoredEvent._get_db()[name]  # type: ignore[no-any-return]


def ensure_indexes() -> None:
    StoredEvent.ensure_indexes()


@dataclass(frozen=True)
class Unpublished:
    """An accepted event on its way to Kafka."""

    topic: str
    envelope: bytes
    trace_headers: dict[str, str]
    recorded_at: datetime


@dataclass
class _Write:
    topic: str
    envelopes: Sequence[EventEnvelope]
    trace_headers: dict[str, str]
    after: Future[None] | None  # the write this one builds on, still in flight when it was made
    future: Future[None] = field(default_factory=Future)
    context: otel_context.Context = field(default_factory=otel_context.get_current)  # the request's trace

    @property
    def aggregate_id(self) -> str:
        return self.envelopes[0].aggregate_id

    def doc(self, envelope: EventEnvelope, now: datetime) -> dict[str, Any]:
        return {
            "_id": event_key(envelope.aggregate_id, envelope.sequence),
            "event_id": envelope.event_id,
            "aggregate_id": envelope.aggregate_id,
            "sequence": envelope.sequence,
            "event_type": envelope.event_type,
            "topic": self.topic,
            "envelope": envelope.SerializeToString(),
            "trace_headers": self.trace_headers,
            "recorded_at": now,
        }


def _failed(future: Future[None] | None) -> bool:
    return future is not None and future.done() and future.exception() is not None


class EventStore:
    def __init__(self, log_name: str = "events", max_batch_events: int = MAX_BATCH_EVENTS) -> None:
        self.log_name = log_name
        self._max_batch = max_batch_events
        self._queue: deque[_Write] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._next: int | None = None  # next commit number; found in the log when unknown
        self._doubtful: int | None = None  # an intent whose write failed: it may be in the log, empty
        self._boundary: int | None = None  # first number this process commits; the ones before are read back
        self._committed: dict[int, list[Unpublished]] = {}  # handed to the relay, in memory
        self._handover = threading.Lock()
        self._published: int | None = None  # the relay's position in the log
        self._position_saved_at = 0.0
        self._answered: int | None = None  # the last commit whose writers were answered

    def answered_through(self) -> int | None:
        """The number of the last commit in this log whose writers have been answered (None
        before this process's first): a write answered afterwards is in a later commit."""
        return self._answered

    # ---- reading ----

    def load(self, aggregate_id: str) -> list[EventEnvelope]:
        return [envelope for envelope, _ in self.load_stored(aggregate_id)]

    def load_stored(self, aggregate_id: str) -> list[tuple[EventEnvelope, dict[str, str]]]:
        """The aggregate's events, each with the W3C context of the request that stored it."""
        return self._read(aggregate_id, 1)

    def load_after(self, aggregate_id: str, version: int) -> list[EventEnvelope] | None:
        """The aggregate's events after `version` (a snapshot's, a folded state's); None if
        the store does not hold event `version` (that state is not this aggregate's)."""
        events = collection(EVENTS_COLLECTION)
        if version > 0 and events.find_one({"_id": event_key(aggregate_id, version)}, {"_id": 1}) is None:
            return None
        return [envelope for envelope, _ in self._read(aggregate_id, version + 1)]

    @staticmethod
    def _read(aggregate_id: str, first: int) -> list[tuple[EventEnvelope, dict[str, str]]]:
        events = collection(EVENTS_COLLECTION)
        loaded: list[tuple[EventEnvelope, dict[str, str]]] = []
        fields = {"envelope": 1, "trace_headers": 1}
        while doc := events.find_one({"_id": event_key(aggregate_id, first + len(loaded))}, fields):
            loaded.append((EventEnvelope.FromString(doc["envelope"]), dict(doc.get("trace_headers") or {})))
        return loaded

    def commits_from(self, number: int) -> Iterator[tuple[int, list[EventEnvelope]]]:
        """This log's commits from `number` to its head, in order, each with the events its
        intent holds: refused ones too (the store says which were accepted)."""
        while (intent := self._intent(number)) is not None:
            yield number, [EventEnvelope.FromString(e.envelope) for e in CommitBatch.FromString(intent["batch"]).events]
            number += 1

    # ---- writing ----

    def submit(
        self,
        topic: str,
        envelopes: Sequence[EventEnvelope],
        trace_headers: dict[str, str],
        after: Future[None] | None = None,
    ) -> Future[None]:
        """Queue one aggregate's events for the next group commit.

        The future fails with ConcurrencyConflict if the sequence is taken (someone
        else won the race) or if `after`, the write these events build on, failed."""
        write = _Write(topic, envelopes, trace_headers, after)
        with self._ready:
            if self._thread is None:  # started on first use: nothing runs at import or construction
                self._thread = threading.Thread(target=self._run, name=f"commit-{self.log_name}", daemon=True)
                self._thread.start()
            self._queue.append(write)
            self._ready.notify()
        return write.future

    def append(self, topic: str, envelopes: Sequence[EventEnvelope], trace_headers: dict[str, str]) -> None:
        """Append in order and wait until durable; a sequence already taken is a ConcurrencyConflict."""
        self.submit(topic, envelopes, trace_headers).result()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                batch: list[_Write] = []
                size = 0
                while self._queue and size < self._max_batch:
                    batch.append(self._queue.popleft())
                    size += len(batch[-1].envelopes)
            try:
                self._commit(batch)
            except Exception as exc:  # a bug, not an outage (those are handled inside): fail loudly
                log.exception("group commit failed")
                for write in batch:
                    if not write.future.done():
                        write.future.set_exception(exc)

    def _commit(self, batch: list[_Write]) -> None:
        writes = []
        for write in batch:
            if _failed(write.after):
                write.future.set_exception(
                    ConcurrencyConflict(f"aggregate {write.aggregate_id}: an earlier write failed")
                )
            else:
                writes.append(write)
        if not writes:
            return
        # One commit serves many requests: it is one span, in the first one's trace.  Its
        # database calls are not traced one by one: a span each (two or more per commit,
        # about 16 per interaction) cost about a tenth of the routing throughput.
        with (
            trace.get_tracer(TRACER_NAME).start_as_current_span(
                f"insert {EVENTS_COLLECTION}",
                context=writes[0].context,
                kind=SpanKind.CLIENT,
                attributes=self._span_attributes(writes),
            ),
            suppress_instrumentation(),
        ):
            self._commit_writes(writes)

    def _span_attributes(self, writes: list[_Write]) -> dict[str, Any]:
        return {
            "db.system.name": "mongodb",
            "db.operation.name": "insert",
            "db.collection.name": EVENTS_COLLECTION,
            "db.namespace": str(StoredEvent._get_db().name),
            "centralino.commit.log": self.log_name,
            "centralino.commit.writes": len(writes),
            "centralino.commit.events": sum(len(w.envelopes) for w in writes),
        }

    def _commit_writes(self, writes: list[_Write]) -> None:
        now = datetime.now(UTC)
        docs = [[write.doc(envelope, now) for envelope in write.envelopes] for write in writes]
        try:
            number, outcome = self._write(writes, docs, now)
        except Exception as exc:  # nothing of this batch was written
            for write in writes:
                write.future.set_exception(exc)
            return
        accepted = [
            Unpublished(w.topic, d["envelope"], w.trace_headers, now)
            for w, write_docs, refused in zip(writes, docs, outcome, strict=True)
            if refused is None
            for d in write_docs
        ]
        with self._handover:
            self._committed[number] = accepted
        self._answered = number
        for write, refused in zip(writes, outcome, strict=True):
            if refused is None:
                write.future.set_result(None)
            else:
                write.future.set_exception(refused)

    def _write(
        self, writes: list[_Write], docs: list[list[dict[str, Any]]], now: datetime
    ) -> tuple[int, list[Exception | None]]:
        """Write the intent and the events under the next commit number; the number and,
        per write, None or why it was refused."""
        batch = CommitBatch(
            events=[
                CommittedEvent(topic=w.topic, envelope=d["envelope"], trace_headers=w.trace_headers)
                for w, write_docs in zip(writes, docs, strict=True)
                for d in write_docs
            ]
        ).SerializeToString()
        for _ in range(5):
            number = self._next if self._next is not None else self._next_free()
            intent = {"_id": commit_key(self.log_name, number), "batch": batch, "at": now}
            try:
                outcome = self._insert_events(writes, docs, intent)
            except _IntentTaken:  # another writer of this log took the number
                self._next = None
                continue
            except Exception:
                self._next, self._doubtful = None, number  # the intent may or may not be there
                raise
            self._next = number + 1
            return number, outcome
        raise ConcurrencyConflict(f"commit log {self.log_name}: could not take a commit number")

    def _next_free(self) -> int:
        head = self._head()
        with self._handover:
            if self._boundary is None:
                self._boundary = head
            # A doubtful intent that did land has no events in the store: nothing to publish.
            for number in range(max(self._doubtful or head, self._boundary), head):
                self._committed.setdefault(number, [])
        self._doubtful = None
        return head

    def _first_own_number(self) -> int:
        with self._handover:
            if self._boundary is not None:
                return self._boundary
        head = self._head()
        with self._handover:
            if self._boundary is None:
                self._boundary = head
            return self._boundary

    def _head(self) -> int:
        """The first free number in this log (no gaps: numbers are taken in order)."""

        def taken(n: int) -> bool:
            return self._intent(n, {"_id": 1}) is not None

        low = self._position()  # taken (or 0)
        step = 1
        while taken(low + step):
            low, step = low + step, step * 2
        high = low + step  # free
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if taken(middle) else (low, middle)
        return high

    def _insert_events(
        self, writes: list[_Write], docs: list[list[dict[str, Any]]], intent: dict[str, Any]
    ) -> list[Exception | None]:
        """Insert the intent, then every write's events; per write, None or why it was refused.

        One ordered insert: the intent, each aggregate's first event of the batch (it
        decides the race for the aggregate), then the following events.  It stops at the
        first key taken: if that is the intent's, nothing was written (_IntentTaken).
        Otherwise what is left goes on in two unordered inserts, the first events, then
        the following events of the aggregates whose first event is in.  Documents are
        told apart by identity: two writes may carry the same key.

        A batch of more than ONE_INSERT_MAX_DOCS documents has its intent inserted alone
        first: FerretDB v1 goes on past a duplicate key in an ordered insert of more than
        about 100 documents (300 sent, the 151st taken: 250 inserted), which would store
        events built on a race lost; test_chained_writes_across_many_commits catches it."""
        chains: dict[str, list[int]] = defaultdict(list)
        for index, write in enumerate(writes):
            chains[write.aggregate_id].append(index)
        heads = [docs[chain[0]][0] for chain in chains.values()]
        first = {id(d) for d in heads}
        following = [d for chain in chains.values() for i in chain for d in docs[i] if id(d) not in first]
        ordered = [intent, *heads, *following]
        if len(ordered) > ONE_INSERT_MAX_DOCS:
            ordered = [intent]
        try:
            landed = self._insert_in_order(ordered)
        except _Unknown as unknown:  # an outage mid-insert: find out what landed
            if len(ordered) == 1:
                raise unknown.cause from None
            refused = self._settle(docs)
            if len(refused) == len(ordered) - 1:
                raise unknown.cause from None  # no event landed: the intent may have, empty
            return self._outcome(writes, docs, chains, refused)  # some did: the intent, first, too
        if landed == 0:
            raise _IntentTaken
        done = {id(d) for d in ordered[:landed]}
        refused = {id(ordered[landed])} if landed < len(ordered) else set()
        try:
            refused |= self._insert([d for d in heads if id(d) not in done and id(d) not in refused])
            refused |= self._insert(
                [
                    d
                    for chain in chains.values()
                    if id(docs[chain[0]][0]) not in refused
                    for i in chain
                    for d in docs[i]
                    if id(d) not in first and id(d) not in done and id(d) not in refused
                ]
            )
        except _Unknown:
            refused = self._settle(docs)  # an outage mid-insert: find out what landed
        return self._outcome(writes, docs, chains, refused)

    def _outcome(
        self,
        writes: list[_Write],
        docs: list[list[dict[str, Any]]],
        chains: dict[str, list[int]],
        refused: set[int],
    ) -> list[Exception | None]:
        """Per write, None or why it was refused: a write with a refused event fails, and so
        does every later write of its aggregate; what those had inserted is taken back."""
        outcome: list[Exception | None] = [None] * len(writes)
        for chain in chains.values():
            failed_from = next((k for k, i in enumerate(chain) if any(id(d) in refused for d in docs[i])), None)
            if failed_from is None:
                continue
            for i in chain[failed_from:]:  # a refused write, and every later one building on it
                outcome[i] = ConcurrencyConflict(f"aggregate {writes[i].aggregate_id} changed concurrently")
                self._take_back([d for d in docs[i] if id(d) not in refused])
        return outcome

    @staticmethod
    def _insert_in_order(docs: list[dict[str, Any]]) -> int:
        """An ordered insert_many; returns how many documents went in before the first one
        whose key is taken (all of them: len(docs)).  Any other failure leaves the outcome
        unknown (_Unknown), except finding no server: then nothing was sent."""
        try:
            collection(EVENTS_COLLECTION).insert_many(docs, ordered=True)
        except ServerSelectionTimeoutError:
            raise  # fail the batch at once: waiting out the outage to settle it is not needed
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if not errors or errors[0].get("code") != _DUPLICATE_KEY:
                raise _Unknown(exc) from exc
            return int(errors[0]["index"])
        except Exception as exc:
            raise _Unknown(exc) from exc
        return len(docs)

    @staticmethod
    def _insert(docs: list[dict[str, Any]]) -> set[int]:
        """insert_many; returns the identities of the documents refused because their
        key is taken.  Any other failure leaves the outcome unknown (_Unknown)."""
        if not docs:
            return set()
        try:
            collection(EVENTS_COLLECTION).insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != _DUPLICATE_KEY for error in errors):
                raise _Unknown(exc) from exc
            return {id(docs[error["index"]]) for error in errors}
        except Exception as exc:
            raise _Unknown(exc) from exc
        return set()

    def _settle(self, docs: list[list[dict[str, Any]]]) -> set[int]:
        """Which of these documents are not in the store as ours; waits out an outage."""
        delay = 0.2
        while True:
            try:
                return self._missing([d for write in docs for d in write])
            except Exception:
                log.exception("event store unreachable while settling a commit; retrying in %.1fs", delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    @staticmethod
    def _missing(docs: list[dict[str, Any]]) -> set[int]:
        """Identities of the documents whose key is free or holds another event."""
        events = collection(EVENTS_COLLECTION)
        missing = set()
        for doc in docs:
            found = events.find_one({"_id": doc["_id"]}, {"event_id": 1})
            if found is None or found["event_id"] != doc["event_id"]:
                missing.add(id(doc))
        return missing

    @staticmethod
    def _take_back(docs: list[dict[str, Any]]) -> None:
        # Our events after the point where another writer won: they must not stay.
        for doc in docs:
            collection(EVENTS_COLLECTION).delete_one({"_id": doc["_id"], "event_id": doc["event_id"]})

    # ---- the relay's side ----

    def _intent(self, number: int, projection: dict[str, int] | None = None) -> dict[str, Any] | None:
        found = collection(EVENTS_COLLECTION).find_one({"_id": commit_key(self.log_name, number)}, projection)
        if found is None:  # written before intents joined the events
            key = legacy_commit_key(self.log_name, number)
            found = collection(LEGACY_COMMITS_COLLECTION).find_one({"_id": key}, projection)
        return found  # type: ignore[no-any-return]

    def _position(self) -> int:
        doc = collection("event_relay").find_one({"_id": self.log_name})
        return int(doc["position"]) if doc else 0

    def unpublished(self, limit: int) -> tuple[list[Unpublished], int]:
        """Accepted events after the relay's position, in commit order, and the position after them.

        Commits of this process come from memory; older ones (a previous process's,
        up to a crash) are read back from the log and settled from the store."""
        if self._published is None:
            self._published = self._position()
        boundary = self._first_own_number()
        events: list[Unpublished] = []
        position = self._published
        while len(events) < limit:
            number = position + 1
            if number >= boundary:
                with self._handover:  # kept until marked published: a failed send goes again
                    committed = self._committed.get(number)
                if committed is None:
                    break  # not committed yet: order matters, wait for it
                events += committed
            else:
                intent = self._intent(number)
                if intent is None:
                    break  # cannot happen without a gap; wait rather than skip
                events += self._settle_intent(intent)
            position = number
        return events, position

    def _settle_intent(self, intent: dict[str, Any]) -> list[Unpublished]:
        at = intent["at"] if intent["at"].tzinfo else intent["at"].replace(tzinfo=UTC)
        batch = CommitBatch.FromString(intent["batch"])
        envelopes = [EventEnvelope.FromString(e.envelope) for e in batch.events]
        docs = [{"_id": event_key(env.aggregate_id, env.sequence), "event_id": env.event_id} for env in envelopes]
        missing = self._missing(docs)
        if missing:
            log.warning("commit %s: %d of %d events were not accepted", intent["_id"], len(missing), len(docs))
        return [
            Unpublished(e.topic, e.envelope, dict(e.trace_headers), at)
            for e, d in zip(batch.events, docs, strict=True)
            if id(d) not in missing
        ]

    def mark_published(self, position: int, force: bool = False) -> None:
        """Remember the relay's position; saved at most every POSITION_EVERY_S unless forced."""
        with self._handover:
            for number in range((self._published or 0) + 1, position + 1):
                self._committed.pop(number, None)
        self._published = position
        if force or time.monotonic() - self._position_saved_at >= POSITION_EVERY_S:
            collection("event_relay").update_one({"_id": self.log_name}, {"$set": {"position": position}}, upsert=True)
            self._position_saved_at = time.monotonic()


class _Unknown(Exception):
    """A write failed in a way that leaves unknown what landed."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _IntentTaken(Exception):
    """The commit number is another writer's: nothing of the batch was written."""
