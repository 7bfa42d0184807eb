"""Agent read model in MongoDB (mongoengine) and the idempotent writes that maintain it."""

from __future__ import annotations

from datetime import UTC, datetime

import mongoengine as me


class SkillDoc(me.EmbeddedDocument):
    name = me.StringField(required=True)
    proficiency = me.IntField(required=True)


class ChannelDoc(me.EmbeddedDocument):
    channel = me.IntField(required=True)
    max_concurrent = me.IntField(required=True)


class AgentDocument(me.Document):
    agent_id = me.StringField(primary_key=True)
    name = me.StringField()
    team_id = me.StringField()
    seniority = me.IntField()
    skills = me.EmbeddedDocumentListField(SkillDoc)
    channels = me.EmbeddedDocumentListField(ChannelDoc)
    registered_at = me.DateTimeField()
    # Bookkeeping written in the same update as the change it records, so a
    # redelivered or replayed event is recognised and changes nothing.
    version = me.IntField(default=0)  # sequence of the last applied event
    last_event_id = me.StringField()
    events_applied = me.IntField(default=0)
    trace_id = me.StringField()  # trace of the request behind the last change, for SRE
    projected_at = me.DateTimeField()

    meta = {"collection": "agents_view", "auto_create_index": False, "indexes": ["team_id"]}


def apply_once(agent_id: str, sequence: int, event_id: str, trace_id: str, **changes: object) -> bool:
    """Apply `changes` only if the document has not yet seen `sequence`; True if applied."""
    update = {f"set__{field}": value for field, value in changes.items()}
    try:
        result = AgentDocument.objects(agent_id=agent_id, version__lt=sequence).update_one(
            upsert=True,
            set__version=sequence,
            set__last_event_id=event_id,
            set__trace_id=trace_id,
            set__projected_at=datetime.now(UTC),
            inc__events_applied=1,
            **update,
        )
    except me.NotUniqueError:
        return False  # the document exists with version >= sequence: already applied
    return bool(result)
