"""Event store and transactional outbox in MongoDB.

An accepted command is durable once its events are in this collection: the
unique (aggregate_id, sequence) index is the optimistic-concurrency check, and
the `published` flag makes the same document the outbox that the relay drains
into Kafka.  A broker outage therefore delays events but never loses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import mongoengine as me
from centralino.v1.envelope_pb2 import EventEnvelope
from pymongo.errors import BulkWriteError

from services.kernel.errors import ConcurrencyConflict

_DUPLICATE_KEY = 11000


class StoredEvent(me.Document):
    event_id = me.StringField(primary_key=True)
    aggregate_id = me.StringField(required=True)
    sequence = me.IntField(required=True)
    event_type = me.StringField(required=True)
    topic = me.StringField(required=True)
    envelope = me.BinaryField(required=True)
    trace_headers = me.DictField()  # W3C context of the request that produced it
    published = me.BooleanField(default=False)
    recorded_at = me.DateTimeField(required=True)

    meta = {
        "collection": "event_store",
        "auto_create_index": False,
        "indexes": [
            {"fields": ["aggregate_id", "sequence"], "unique": True},
            {"fields": ["published", "aggregate_id", "sequence"]},
        ],
    }


def ensure_indexes() -> None:
    StoredEvent.ensure_indexes()


class EventStore:
    def load(self, aggregate_id: str) -> list[EventEnvelope]:
        stored = StoredEvent.objects(aggregate_id=aggregate_id).order_by("sequence").only("envelope")
        return [EventEnvelope.FromString(doc.envelope) for doc in stored]

    def append(self, topic: str, envelopes: Sequence[EventEnvelope], trace_headers: dict[str, str]) -> None:
        """Append in order; a sequence already taken means someone else won the race."""
        now = datetime.now(UTC)
        docs = [
            StoredEvent(
                event_id=env.event_id,
                aggregate_id=env.aggregate_id,
                sequence=env.sequence,
                event_type=env.event_type,
                topic=topic,
                envelope=env.SerializeToString(),
                trace_headers=trace_headers,
                recorded_at=now,
            )
            for env in envelopes
        ]
        try:
            StoredEvent._get_collection().insert_many([doc.to_mongo() for doc in docs], ordered=True)
        except BulkWriteError as exc:
            if any(error.get("code") == _DUPLICATE_KEY for error in exc.details.get("writeErrors", [])):
                raise ConcurrencyConflict(f"aggregate {envelopes[0].aggregate_id} changed concurrently") from exc
            raise

    def unpublished(self, limit: int) -> list[StoredEvent]:
        # Sorted by aggregate then sequence so each aggregate's events reach Kafka in order.
        return list(StoredEvent.objects(published=False).order_by("aggregate_id", "sequence").limit(limit))

    def mark_published(self, event_ids: Sequence[str]) -> None:
        if event_ids:
            StoredEvent.objects(event_id__in=list(event_ids)).update(set__published=True)
