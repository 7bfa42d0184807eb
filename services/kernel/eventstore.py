"""Event store and transactional outbox in MongoDB.

An accepted command is durable once its events are in `event_store`: the unique
(aggregate_id, sequence) index is the optimistic-concurrency check.  Events to
publish wait in a small `event_outbox` collection that the relay drains into
Kafka, so a broker outage delays events but never loses them.

Why two collections: MongoDB-wire servers without index-backed filters (FerretDB
v1 on SQLite scans a collection for every query) would otherwise scan the whole
event history on every drain.  The outbox only ever holds what is still to go.

Why the commit flag: there are no multi-document transactions (FerretDB v1), so
an outbox entry is written first, uncommitted; then the events; then the entry is
committed.  A crash in between leaves an uncommitted entry, which `recover`
commits if its event made it into the store and drops otherwise: no event is
published that was not accepted, none accepted is left unpublished.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import mongoengine as me
from centralino.v1.envelope_pb2 import EventEnvelope
from pymongo.errors import BulkWriteError

from services.kernel.errors import ConcurrencyConflict

_DUPLICATE_KEY = 11000


class _EventRecord(me.Document):
    event_id = me.StringField(primary_key=True)
    aggregate_id = me.StringField(required=True)
    sequence = me.IntField(required=True)
    event_type = me.StringField(required=True)
    topic = me.StringField(required=True)
    envelope = me.BinaryField(required=True)
    trace_headers = me.DictField()  # W3C context of the request that produced it
    recorded_at = me.DateTimeField(required=True)

    meta: dict[str, Any] = {"abstract": True}


class StoredEvent(_EventRecord):
    meta: dict[str, Any] = {
        "collection": "event_store",
        "auto_create_index": False,
        "indexes": [
            {"fields": ["aggregate_id", "sequence"], "unique": True},
            {"fields": ["topic", "aggregate_id", "sequence"]},
        ],
    }


class PendingEvent(_EventRecord):
    committed = me.BooleanField(default=False)

    meta: dict[str, Any] = {"collection": "event_outbox", "auto_create_index": False}


def ensure_indexes() -> None:
    StoredEvent.ensure_indexes()
    PendingEvent.ensure_indexes()


class EventStore:
    def load(self, aggregate_id: str) -> list[EventEnvelope]:
        stored = StoredEvent.objects(aggregate_id=aggregate_id).order_by("sequence").only("envelope")
        return [EventEnvelope.FromString(doc.envelope) for doc in stored]

    def append(self, topic: str, envelopes: Sequence[EventEnvelope], trace_headers: dict[str, str]) -> None:
        """Append in order; a sequence already taken means someone else won the race."""
        now = datetime.now(UTC)
        fields = [
            {
                "event_id": env.event_id,
                "aggregate_id": env.aggregate_id,
                "sequence": env.sequence,
                "event_type": env.event_type,
                "topic": topic,
                "envelope": env.SerializeToString(),
                "trace_headers": trace_headers,
                "recorded_at": now,
            }
            for env in envelopes
        ]
        ids = [env.event_id for env in envelopes]
        PendingEvent._get_collection().insert_many([PendingEvent(**f).to_mongo() for f in fields])
        try:
            StoredEvent._get_collection().insert_many([StoredEvent(**f).to_mongo() for f in fields], ordered=True)
        except BulkWriteError as exc:
            PendingEvent.objects(event_id__in=ids).delete()
            if any(error.get("code") == _DUPLICATE_KEY for error in exc.details.get("writeErrors", [])):
                raise ConcurrencyConflict(f"aggregate {envelopes[0].aggregate_id} changed concurrently") from exc
            raise
        PendingEvent.objects(event_id__in=ids).update(set__committed=True)

    def unpublished(self, limit: int) -> list[PendingEvent]:
        # Sorted by aggregate then sequence so each aggregate's events reach Kafka in order.
        pending = PendingEvent.objects(committed=True).order_by("aggregate_id", "sequence").limit(limit)
        return list(pending)

    def mark_published(self, event_ids: Sequence[str]) -> None:
        if event_ids:
            PendingEvent.objects(event_id__in=list(event_ids)).delete()

    def recover(self, older_than: timedelta = timedelta(seconds=30)) -> int:
        """Settle outbox entries left uncommitted by a crash; returns how many were kept."""
        kept = 0
        cutoff = datetime.now(UTC) - older_than
        for pending in PendingEvent.objects(committed=False, recorded_at__lt=cutoff):
            if StoredEvent.objects(event_id=pending.event_id).only("event_id").first():
                PendingEvent.objects(event_id=pending.event_id).update(set__committed=True)
                kept += 1
            else:
                pending.delete()
        return kept
