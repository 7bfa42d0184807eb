"""Agents read models in MongoDB (mongoengine) and the idempotent writes that maintain them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import mongoengine as me

from services.agents.state_view import View, new_view


class AgentDocument(me.Document):
    """One agent: profile, live state, today's counters and adherence (see state_view)."""

    agent_id = me.StringField(primary_key=True)
    name = me.StringField()
    team_id = me.StringField()
    seniority = me.IntField()
    skills = me.ListField(me.DictField())
    channels = me.ListField(me.DictField())
    logged_in = me.BooleanField(default=False)
    ready = me.BooleanField(default=False)
    state = me.IntField()
    reason = me.IntField(default=0)
    since = me.FloatField()
    accounted_until = me.FloatField()
    work = me.ListField(me.DictField())
    available_on = me.ListField(me.IntField())
    days = me.DictField()
    shifts = me.DictField()
    # Bookkeeping written in the same update as the change it records, so a
    # redelivered or replayed event is recognised and changes nothing.
    version = me.IntField(default=0)  # sequence of the last applied event
    last_event_id = me.StringField()
    events_applied = me.IntField(default=0)
    trace_id = me.StringField()  # trace of the request behind the last change, for SRE
    projected_at = me.DateTimeField()
    registered_at = me.DateTimeField()

    meta = {
        "collection": "agents_view",
        "auto_create_index": False,
        "indexes": ["team_id", "state", "available_on"],
    }

    def to_view(self) -> View:
        fields = self.to_mongo().to_dict()
        fields["agent_id"] = fields.pop("_id")
        return {**new_view(fields["agent_id"]), **fields}  # unset (None) fields are not stored


class TeamDocument(me.Document):
    team_id = me.StringField(primary_key=True)
    name = me.StringField()
    supervisor_id = me.StringField()
    team_leader_id = me.StringField()
    members = me.ListField(me.StringField())
    version = me.IntField(default=0)
    last_event_id = me.StringField()

    meta = {"collection": "teams_view", "auto_create_index": False}


def ensure_indexes() -> None:
    AgentDocument.ensure_indexes()
    TeamDocument.ensure_indexes()


def _apply_once(document: type[me.Document], key: str, sequence: int, fields: dict[str, Any], **more: Any) -> bool:
    """Write `fields` (and any `more` update operators) only if the document has not yet
    seen `sequence`; True if written."""
    update: dict[str, Any] = {f"set__{name}": value for name, value in fields.items()} | more
    try:
        result = document.objects(pk=key, version__lt=sequence).update_one(upsert=True, **update)
    except me.NotUniqueError:
        return False  # the document exists with version >= sequence: already applied
    return bool(result)


def save_agent_view(view: View, event_id: str, trace_id: str, registered_at: datetime | None = None) -> bool:
    """Write the view after one event (its version); False if the document had seen it."""
    return save_agent_views(view, [view["version"]], event_id, trace_id, registered_at) > 0


def save_agent_views(
    view: View, sequences: Sequence[int], event_id: str, trace_id: str, registered_at: datetime | None = None
) -> int:
    """Write the view folded from the events `sequences` (ascending, the last one the view's
    version; `event_id` and `trace_id` are the last one's) in one update, unless the document
    has seen them all.  `events_applied` grows by how many of them the document had not
    seen, so a replay cut into other batches (a crash between this write and the Faust
    table's update) counts every event once.  Returns that number (0: already applied).
    """
    # events_applied is incremented by the same update; setting it too would conflict.
    fields = {k: v for k, v in view.items() if k not in ("agent_id", "events_applied")}
    fields.update(last_event_id=event_id, trace_id=trace_id, projected_at=datetime.now(UTC))
    if registered_at:
        fields["registered_at"] = registered_at
    key, first, last = view["agent_id"], sequences[0], sequences[-1]
    if _apply_once(AgentDocument, key, first, fields, inc__events_applied=len(sequences)):
        return len(sequences)  # the usual case: the document had seen none of them
    while True:  # it has seen some: a replay overlapping what an earlier batch wrote
        document = AgentDocument.objects(pk=key).only("version").first()
        if document is None:  # gone meanwhile (a rebuild): start it again
            if _apply_once(AgentDocument, key, first, fields, inc__events_applied=len(sequences)):
                return len(sequences)
            continue
        seen = document.version
        if seen >= last:
            return 0
        new = sum(1 for sequence in sequences if sequence > seen)
        update = {f"set__{name}": value for name, value in fields.items()}
        if AgentDocument.objects(pk=key, version=seen).update_one(inc__events_applied=new, **update):
            return new


def save_team_view(team_id: str, sequence: int, event_id: str, **fields: Any) -> bool:
    return _apply_once(TeamDocument, team_id, sequence, {**fields, "version": sequence, "last_event_id": event_id})


BOOKKEEPING = ("last_event_id", "events_applied", "trace_id", "projected_at", "registered_at")


def load_agent_view(agent_id: str) -> View | None:
    """The folded view alone, without the projection's bookkeeping fields."""
    document = AgentDocument.objects(agent_id=agent_id).first()
    if document is None:
        return None
    view = document.to_view()
    for name in BOOKKEEPING:
        view.pop(name, None)
    return view
