"""Agents projections: agent and team events -> `agents_view` and `teams_view`.

One Faust agent reads the department topic (keyed by aggregate id, so each
agent's events arrive in order on one partition) in batches, folds every event
into its agent's view with `state_view.evolve` and writes each agent's document
once per batch.  Each write is conditional on the events' sequences, so
redeliveries and replays change nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import faust
from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import Message

from services.agents import state_view
from services.agents.adapters import (
    AgentDocument,
    TeamDocument,
    ViewWrite,
    load_agent_view,
    save_agent_view,
    save_agent_views,
    save_existing_agent_views,
    save_team_view,
)
from services.agents.events import REGISTRY, TEAM
from services.kernel.config import Settings
from services.kernel.faust_app import Record, envelope_batch_agent
from services.kernel.mongo import shared_command_spans
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


# A batch: up to this many records, gathered for up to `Settings.projection_batch_s`.
BATCH_MAX_RECORDS = 500


@dataclass
class AgentBatch:
    """One agent's events of a batch, folded: the view after them and what its write records."""

    view: state_view.View
    exists: bool  # the agent's document was written before this batch
    records: list[Record] = field(default_factory=list)  # the events applied, in order
    registered_at: datetime | None = None

    @property
    def last(self) -> Record:
        return self.records[-1]

    def write(self) -> ViewWrite:
        sequences = [record.envelope.sequence for record in self.records]
        last = self.last
        return ViewWrite(self.view, sequences, last.envelope.event_id, trace_id_hex(last.span), self.registered_at)


def fold_agents(
    records: Iterable[Record], working: Callable[[str], state_view.View], tz: ZoneInfo
) -> dict[str, AgentBatch]:
    """Fold the agent events of a batch per agent, in order, from each agent's working view
    (`working(agent_id)`); agents whose events were all seen already are left out."""
    batches: dict[str, AgentBatch] = {}
    for record in records:
        envelope, event = record.envelope, record.payload
        assert event is not None  # decoded by the kernel
        key = envelope.aggregate_id
        batch = batches.get(key)
        before = batch.view if batch else working(key)
        after = next_view(before, envelope, event, tz)
        if after is None:
            continue
        if batch is None:  # a working view past version 0 was written to MongoDB first
            batch = batches[key] = AgentBatch(after, exists=before["version"] > 0)
        batch.view = after
        batch.records.append(record)
        if isinstance(event, pb.AgentRegistered):
            batch.registered_at = envelope.occurred_at.ToDatetime(tzinfo=UTC)
    return batches


def write_batch(teams: Sequence[Record], agents: Mapping[str, AgentBatch]) -> None:
    """The batch's MongoDB writes (blocking): each team event on its own; the agents whose
    documents exist in one command, with a CLIENT span in each agent's trace (under the
    CONSUMER span of the last event it applies); new agents one by one."""
    for record in teams:
        with record.current():
            project_team(record.envelope, record.payload)  # type: ignore[arg-type]  # decoded by the kernel
    existing = [batch for batch in agents.values() if batch.exists]
    if existing:
        database = str(AgentDocument._get_db().name)
        with shared_command_spans([batch.last.span for batch in existing], "update", "agents_view", database):
            save_existing_agent_views([batch.write() for batch in existing])
    for batch in agents.values():
        if not batch.exists:
            with batch.last.current():
                save_agent_views(batch.write())


def load_views(records: Iterable[Record]) -> dict[str, state_view.View]:
    """The stored views of the agents of `records`, for a working state that has none (blocking);
    each is read inside the CONSUMER span of the agent's first event."""
    firsts: dict[str, Record] = {}
    for record in records:
        firsts.setdefault(record.envelope.aggregate_id, record)
    loaded = {}
    for key, record in firsts.items():
        with record.current():
            view = load_agent_view(key)
        if view is not None:
            loaded[key] = view
    return loaded


def project_batch(records: Sequence[Record], state: MutableMapping[str, state_view.View], tz: ZoneInfo) -> int:
    """Apply a batch of decoded events to the read models with `state` as the working
    state, synchronously, as the Faust agent does: used by tools and tests.  Returns how
    many agent documents it wrote to (once each, conditionally)."""
    teams, agents = split(records)
    loaded = load_views(record for record in agents if record.envelope.aggregate_id not in state)
    batches = fold_agents(agents, lambda key: state.get(key) or loaded.get(key) or state_view.new_view(key), tz)
    write_batch(teams, batches)
    for key, batch in batches.items():
        state[key] = batch.view  # after MongoDB: a crash in between replays to the same result
    return len(batches)


def split(records: Iterable[Record]) -> tuple[list[Record], list[Record]]:
    teams: list[Record] = []
    agents: list[Record] = []
    for record in records:
        (teams if record.envelope.aggregate_type == TEAM else agents).append(record)
    return teams, agents


def source_topics(settings: Settings) -> list[str]:
    return [settings.topic("agents")]


def register(app: faust.App, settings: Settings) -> None:
    """The projection keeps each agent's view in a changelogged Faust table (its working
    state: no database read per event, and co-partitioned with the topic, since both are
    keyed by agent id) and writes each agent's latest version to MongoDB once per batch,
    for queries."""
    tz = settings.zone
    table = app.Table("agent-state")

    async def project(records: Sequence[Record]) -> None:
        teams, agents = split(records)
        missing = [record for record in agents if record.envelope.aggregate_id not in table]
        loaded = await asyncio.to_thread(load_views, missing) if missing else {}
        batches = fold_agents(agents, lambda key: table.get(key) or loaded.get(key) or state_view.new_view(key), tz)
        if teams or batches:
            await asyncio.to_thread(write_batch, teams, batches)
        for key, batch in batches.items():
            with batch.last.current():  # the changelog goes to the partition of the agent's events
                table[key] = batch.view  # after MongoDB: a crash in between replays to the same result

    envelope_batch_agent(
        app,
        settings.topic("agents"),
        name="agents-view",
        decode=REGISTRY.decode,
        handle=project,
        max_records=BATCH_MAX_RECORDS,
        within_s=settings.projection_batch_s,
    )
