"""The router's checkpoint in MongoDB: where a restart begins, instead of the whole routing log.

A checkpoint says from which commit of the routing log to read on, which interactions
to read back whole from the event store (the open ones, and any with a write still in
flight when it was taken), and the queues' running tallies without those.  It is one
small document per routing log, replaced at every checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import mongoengine as me

log = logging.getLogger(__name__)

FORMAT = 1  # a checkpoint of another format is ignored: the restart folds the whole log


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
    reload: list[str]
    tallies: list[dict[str, Any]]


def save_checkpoint(log_name: str, checkpoint: Checkpoint) -> None:
    RouterCheckpointDocument(
        log=log_name,
        format=FORMAT,
        commit=checkpoint.commit,
        read_back=checkpoint.reload,
        tallies=checkpoint.tallies,
        taken_at=datetime.now(UTC),
    ).save()


def load_checkpoint(log_name: str) -> Checkpoint | None:
    document = RouterCheckpointDocument.objects(pk=log_name).first()
    if document is None:
        return None
    if document.format != FORMAT:
        log.warning("routing checkpoint of format %s, not %s: folding the whole log", document.format, FORMAT)
        return None
    return Checkpoint(document.commit, list(document.read_back), [dict(row) for row in document.tallies])


def drop_checkpoint(log_name: str) -> None:
    RouterCheckpointDocument.objects(pk=log_name).delete()
