"""Agents projections: agent and team events -> `agents_view` and `teams_view`.

One Faust agent reads the department topic (keyed by aggregate id, so each
agent's events arrive in order on one partition) and folds every event into its
read model with `state_view.evolve`.  Each write is conditional on the event's
sequence, so redeliveries and replays change nothing.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC
from zoneinfo import ZoneInfo

import faust
from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import Message

from services.agents import state_view
from services.agents.adapters import TeamDocument, load_agent_view, save_agent_view, save_team_view
from services.agents.events import REGISTRY, TEAM
from services.kernel.config import Settings
from services.kernel.faust_app import envelope_agent
from services.kernel.telemetry import trace_id_hex

log = logging.getLogger(__name__)


def next_view(view: state_view.View, envelope: EventEnvelope, event: Message, tz: ZoneInfo) -> state_view.View | None:
    """The view after the event, or None if the view has seen it already."""
    if envelope.sequence <= view["version"]:
        return None
    if envelope.sequence != view["version"] + 1:
        log.warning("agent %s: event %d follows %d (gap)", envelope.aggregate_id, envelope.sequence, view["version"])
    at = envelope.occurred_at.ToDatetime(tzinfo=UTC)
    return state_view.evolve(view, event, at.timestamp(), envelope.sequence, tz)


def save(view: state_view.View, envelope: EventEnvelope, event: Message, trace_id: str) -> bool:
    registered_at = envelope.occurred_at.ToDatetime(tzinfo=UTC) if isinstance(event, pb.AgentRegistered) else None
    return save_agent_view(view, envelope.event_id, trace_id, registered_at)


def project_agent(envelope: EventEnvelope, event: Message, tz: ZoneInfo) -> bool:
    """Apply one agent event to the read model alone (no Faust table): used by tools and tests."""
    view = load_agent_view(envelope.aggregate_id) or state_view.new_view(envelope.aggregate_id)
    after = next_view(view, envelope, event, tz)
    return after is not None and save(after, envelope, event, trace_id_hex())


def project_team(envelope: EventEnvelope, event: Message) -> bool:
    team_id: str = event.team_id  # type: ignore[attr-defined]  # every team event has one
    document = TeamDocument.objects(team_id=team_id).first()
    members = set(document.members) if document else set()
    fields: dict[str, object] = {}
    if isinstance(event, pb.TeamCreated):
        fields = {"name": event.name, "supervisor_id": event.supervisor_id}
    elif isinstance(event, pb.TeamLeaderAssigned):
        fields = {"team_leader_id": event.team_leader_id}
    elif isinstance(event, pb.TeamMemberJoined):
        fields = {"members": sorted(members | {event.agent_id})}
    elif isinstance(event, pb.TeamMemberLeft):
        fields = {"members": sorted(members - {event.agent_id})}
    return save_team_view(team_id, envelope.sequence, envelope.event_id, **fields)


def projector(tz: ZoneInfo):  # type: ignore[no-untyped-def]
    def project(envelope: EventEnvelope) -> bool:
        """Apply one event to its read model; False if it had been applied already."""
        event = REGISTRY.decode(envelope)
        if envelope.aggregate_type == TEAM:
            return project_team(envelope, event)
        return project_agent(envelope, event, tz)

    return project


def source_topics(settings: Settings) -> list[str]:
    return [settings.topic("agents")]


def register(app: faust.App, settings: Settings) -> None:
    """The projection keeps each agent's view in a changelogged Faust table (its working
    state: no database read per event, and co-partitioned with the topic, since both are
    keyed by agent id) and writes every new version to MongoDB for queries."""
    tz = settings.zone
    table = app.Table("agent-state")

    async def project(envelope: EventEnvelope) -> None:
        event = REGISTRY.decode(envelope)
        if envelope.aggregate_type == TEAM:
            await asyncio.to_thread(project_team, envelope, event)
            return
        key = envelope.aggregate_id
        view = table.get(key) or await asyncio.to_thread(load_agent_view, key) or state_view.new_view(key)
        after = next_view(view, envelope, event, tz)
        if after is None:
            return
        await asyncio.to_thread(save, after, envelope, event, trace_id_hex())
        table[key] = after  # after MongoDB: a crash in between replays to the same result

    envelope_agent(app, settings.topic("agents"), name="agents-view", handle=project)
