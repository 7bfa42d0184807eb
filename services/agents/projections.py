"""Agent read model projection: agent events -> `agents_view` documents."""

from __future__ import annotations

from datetime import UTC

import faust
from centralino.v1.agents_pb2 import AgentRegistered
from centralino.v1.envelope_pb2 import EventEnvelope

from services.agents.adapters import ChannelDoc, SkillDoc, apply_once
from services.agents.events import REGISTRY
from services.kernel.config import Settings
from services.kernel.faust_app import envelope_agent
from services.kernel.telemetry import trace_id_hex


def project(envelope: EventEnvelope) -> bool:
    """Apply one agent event to the read model; False if it had been applied already."""
    event = REGISTRY.decode(envelope)
    changes: dict[str, object] = {}
    if isinstance(event, AgentRegistered):
        changes = {
            "name": event.name,
            "team_id": event.team_id,
            "seniority": event.seniority,
            "skills": [SkillDoc(name=s.name, proficiency=s.proficiency) for s in event.skills],
            "channels": [ChannelDoc(channel=c.channel, max_concurrent=c.max_concurrent) for c in event.channels],
            "registered_at": envelope.occurred_at.ToDatetime(tzinfo=UTC),
        }
    return apply_once(envelope.aggregate_id, envelope.sequence, envelope.event_id, trace_id_hex(), **changes)


def source_topics(settings: Settings) -> list[str]:
    return [settings.topic("agents")]


def register(app: faust.App, settings: Settings) -> None:
    envelope_agent(app, settings.topic("agents"), name="agents-view", handle=project)
