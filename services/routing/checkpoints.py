"""The router's checkpoint in MongoDB: where a restart begins, instead of the whole routing log
and the whole agents topic.

A checkpoint says from which commit of the routing log to read on, which interactions
to read back whole from the event store (the open ones, and any with a write still in
flight when it was taken), and the queues' running tallies without those.  Beside it,
the agent feed's picture of every agent and the agents topic's offsets it reads on
from.  Each is one document per routing log, replaced at every checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import mongoengine as me

from services.routing.agent_feed import FeedSnapshot

log = logging.getLogger(__name__)

FORMAT = 1  # a checkpoint of another format is ignored: the restart folds the whole log
FEED_FORMAT = 1  # likewise for the feed's: it reads the agents topic from its beginning


class RouterCheckpointDocument(me.Document):
    log = me.StringField(primary_key=True)  # the routing log (its topic)
    format = me.IntField(required=True)
    commit = me.IntField(required=True)  # the first commit of the log the checkpoint does not hold
    read_back = me.ListField(me.StringField())  # interactions read back whole from the event store
    tallies = me.ListField(me.DictField())  # DayTallies.rows()
    taken_at = me.DateTimeField()

    meta: dict[str, Any] = {
        "collection": "routing_checkpoints",
        "db_alias": "events",  # services.kernel.mongo.EVENTS_ALIAS: beside the log it points into
        "auto_create_index": False,
    }


@dataclass(frozen=True)
class Checkpoint:
    commit: int
    read_back: list[str]
    tallies: list[dict[str, Any]]


def save_checkpoint(log_name: str, checkpoint: Checkpoint) -> None:
    RouterCheckpointDocument(
        log=log_name,
        format=FORMAT,
        commit=checkpoint.commit,
        read_back=checkpoint.read_back,
        tallies=checkpoint.tallies,
        taken_at=datetime.now(UTC),
    ).save()


def _current(kind: type[me.Document], log_name: str, expected: int, otherwise: str) -> Any:
    """The log's document of `kind` if there is one of the `expected` format, else None."""
    document = kind.objects(pk=log_name).first()  # type: ignore[attr-defined]
    if document is not None and document.format != expected:
        log.warning("%s of format %s, not %s: %s", kind.__name__, document.format, expected, otherwise)
        return None
    return document


def load_checkpoint(log_name: str) -> Checkpoint | None:
    document = _current(RouterCheckpointDocument, log_name, FORMAT, "folding the whole routing log")
    if document is None:
        return None
    return Checkpoint(document.commit, list(document.read_back), [dict(row) for row in document.tallies])


def drop_checkpoint(log_name: str) -> None:
    RouterCheckpointDocument.objects(pk=log_name).delete()


class FeedCheckpointDocument(me.Document):
    log = me.StringField(primary_key=True)  # the routing log whose router keeps this feed
    format = me.IntField(required=True)
    views = me.ListField(me.DictField())  # state_view views, one per agent
    leaders = me.DictField()  # team -> team leader
    positions = me.ListField(me.DictField())  # {"partition": p, "offset": next offset to read}
    taken_at = me.DateTimeField()

    meta: dict[str, Any] = {
        "collection": "routing_feed_checkpoints",
        "db_alias": "events",
        "auto_create_index": False,
    }


def save_feed_checkpoint(log_name: str, snapshot: FeedSnapshot) -> None:
    FeedCheckpointDocument(
        log=log_name,
        format=FEED_FORMAT,
        views=list(snapshot.views.values()),
        leaders=snapshot.leaders,
        positions=[{"partition": p, "offset": o} for p, o in sorted(snapshot.positions.items())],
        taken_at=datetime.now(UTC),
    ).save()


def load_feed_checkpoint(log_name: str) -> FeedSnapshot | None:
    document = _current(FeedCheckpointDocument, log_name, FEED_FORMAT, "reading the whole agents topic")
    if document is None:
        return None
    return FeedSnapshot(
        {view["agent_id"]: dict(view) for view in document.views},
        dict(document.leaders),
        {int(p["partition"]): int(p["offset"]) for p in document.positions},
    )
