"""The agents projection folds a batch of events per agent in memory and writes each
agent's read-model document once, with the same result as one event at a time, and a
redelivered or replayed batch changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.agents_pb2 import Transition as T
from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import Message
from pymongo import monitoring

from services.agents import adapters, state_view
from services.agents.adapters import AgentDocument, TeamDocument
from services.agents.events import AGENT, REGISTRY, TEAM, team_stream
from services.agents.projections import next_view, project_batch, projector
from services.kernel import mongo as kernel_mongo
from services.kernel.config import Settings
from services.kernel.envelope import Metadata, wrap
from services.kernel.eventstore import EventStore
from services.kernel.faust_app import Record
from tests.helpers import eventually
from tests.integration.conftest import AgentsService

pytestmark = pytest.mark.integration

UTC_ZONE = ZoneInfo("UTC")
META = Metadata(correlation_id="c-1", causation_id="cmd-1", producer="test")
START = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
AGENTS = ("anna", "bruno", "carla")
CYCLES = 8  # 3 + 4 x 8 = 35 events per agent
VOLATILE = ("projected_at", "trace_id")  # when it was written, and the (here absent) trace


class Commands(monitoring.CommandListener):
    """Counts the database commands this test's client sends, per (command, collection)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        key = (event.command_name, target if isinstance(target, str) else "")
        self.counts[key] = self.counts.get(key, 0) + 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def reset(self) -> None:
        self.counts.clear()

    def writes(self, collection: str) -> int:
        return self.counts.get(("update", collection), 0)


@pytest.fixture
def commands(settings: Settings) -> Iterator[Commands]:
    """mongoengine on this test's own database, through a client whose commands are counted."""
    listener = Commands()
    client = kernel_mongo.connect(settings, event_listeners=[listener])
    adapters.ensure_indexes()
    try:
        yield listener
    finally:
        kernel_mongo.drop_databases(client, settings)
        kernel_mongo.disconnect()


def agent_events(agent_id: str) -> list[Message]:
    events: list[Message] = [
        pb.AgentRegistered(
            agent_id=agent_id,
            name=agent_id.title(),
            team_id="t1",
            seniority=pb.CONSULTANT,
            channels=[pb.ChannelCapacity(channel=pb.VOICE, max_concurrent=1)],
        ),
        pb.AgentStateChanged(agent_id=agent_id, team_id="t1", transition=T.LOG_IN),
        pb.AgentStateChanged(agent_id=agent_id, team_id="t1", transition=T.GO_READY),
    ]
    for cycle in range(CYCLES):
        interaction = f"{agent_id}-{cycle}"
        for transition in (T.RESERVE, T.CONNECT, T.END, T.COMPLETE_WRAP_UP):
            events.append(
                pb.AgentStateChanged(
                    agent_id=agent_id, team_id="t1", transition=transition, interaction_id=interaction, channel=pb.VOICE
                )
            )
    return events


def the_log() -> list[EventEnvelope]:
    """Every agent's events and a team's, interleaved as live traffic interleaves them."""
    streams = [(AGENT, agent, agent_events(agent)) for agent in AGENTS]
    team: list[Message] = [pb.TeamCreated(team_id="t1", name="Milano", supervisor_id="sup")]
    team += [pb.TeamMemberJoined(team_id="t1", agent_id=agent) for agent in AGENTS]
    streams.append((TEAM, team_stream("t1"), team))
    envelopes: list[EventEnvelope] = []
    for index in range(max(len(events) for _, _, events in streams)):
        for aggregate_type, aggregate_id, events in streams:
            if index < len(events):
                occurred = START + timedelta(seconds=7 * len(envelopes))
                envelopes.append(
                    wrap(
                        events[index],
                        registry=REGISTRY,
                        aggregate_type=aggregate_type,
                        aggregate_id=aggregate_id,
                        sequence=index + 1,
                        meta=META,
                        occurred_at=occurred,
                    )
                )
    return envelopes


def records(envelopes: list[EventEnvelope]) -> list[Record]:
    """As the kernel hands them over: decoded, outside any trace or Faust event."""
    return [Record(envelope, payload=REGISTRY.decode(envelope)) for envelope in envelopes]


def documents() -> dict[str, dict[str, Any]]:
    found = {}
    for document in [*AgentDocument.objects, *TeamDocument.objects]:
        fields = document.to_mongo().to_dict()
        for name in VOLATILE:
            fields.pop(name, None)
        found[fields["_id"]] = fields
    return found


def one_at_a_time(envelopes: list[EventEnvelope]) -> dict[str, dict[str, Any]]:
    """The documents the one-event-at-a-time projection makes (then forgotten)."""
    project = projector(UTC_ZONE)
    for envelope in envelopes:
        project(envelope)
    expected = documents()
    AgentDocument.drop_collection()
    TeamDocument.drop_collection()
    adapters.ensure_indexes()
    return expected


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def test_a_batch_writes_each_agent_once_with_the_same_result(commands: Commands) -> None:
    log = the_log()
    expected = one_at_a_time(log)
    agent_events_count = sum(1 for e in log if e.aggregate_type == AGENT)
    assert {expected[a]["version"] for a in AGENTS} == {len(agent_events(AGENTS[0]))}

    commands.reset()
    assert project_batch(records(log), {}, UTC_ZONE) == len(AGENTS)
    assert commands.writes("agents_view") == len(AGENTS)  # 3 writes for 105 events
    assert agent_events_count == 105
    assert documents() == expected  # events_applied, last_event_id and version included


def test_smaller_batches_give_the_same_documents(commands: Commands) -> None:
    log = the_log()
    expected = one_at_a_time(log)
    state: dict[str, state_view.View] = {}
    for batch in chunks(records(log), 17):
        agents = {r.envelope.aggregate_id for r in batch if r.envelope.aggregate_type == AGENT}
        known = agents & set(state)
        commands.reset()
        assert project_batch(batch, state, UTC_ZONE) == len(agents)
        # The agents written before share one command; a new agent's first write is its own.
        assert commands.writes("agents_view") == (1 if known else 0) + len(agents - known)
    assert documents() == expected


def test_a_redelivered_batch_changes_nothing(commands: Commands) -> None:
    log = the_log()
    state: dict[str, state_view.View] = {}
    project_batch(records(log), state, UTC_ZONE)
    before = documents()

    commands.reset()  # the same batch again, the working state already past it: not even a read
    assert project_batch(records(log), state, UTC_ZONE) == 0
    assert commands.writes("agents_view") == 0 and documents() == before

    # Again with the working state lost (a crash after the MongoDB writes, before the
    # table's update): folded again from the stored views, written nowhere.
    assert project_batch(records(log), {}, UTC_ZONE) == 0
    assert documents() == before


def test_a_replay_cut_into_other_batches_counts_every_event_once(commands: Commands) -> None:
    log = the_log()
    expected = one_at_a_time(log)
    first, second, rest = log[:40], log[40:70], log[70:]
    state: dict[str, state_view.View] = {}
    project_batch(records(first), state, UTC_ZONE)
    table_before_crash = dict(state)
    project_batch(records(second), state, UTC_ZONE)  # written to MongoDB; then the crash
    # The table restarts from before the second batch, whose events come again together
    # with the rest: every document has seen part of the replayed batch already.
    project_batch(records(second + rest), table_before_crash, UTC_ZONE)
    assert documents() == expected
    assert {expected[a]["events_applied"] for a in AGENTS} == {35}


def test_the_worker_folds_a_burst_as_one_at_a_time_would(agents: AgentsService) -> None:
    """The real worker (Faust, batches) against the fold of each agent's stored events."""
    ids = [f"burst-{n}" for n in range(3)]
    agents.create_team("t-burst", supervisor_id="sup-burst")
    for agent_id in ids:
        agents.register(agent_id, team_id="t-burst")
        agents.change(agent_id, T.LOG_IN)
        agents.change(agent_id, T.GO_READY)
    for cycle in range(6):
        for agent_id in ids:
            interaction = f"{agent_id}-{cycle}"
            agents.change(agent_id, T.RESERVE, interaction_id=interaction, channel=pb.VOICE)
            agents.change(agent_id, T.CONNECT, interaction_id=interaction)
            agents.change(agent_id, T.END, interaction_id=interaction)
            agents.change(agent_id, T.COMPLETE_WRAP_UP, interaction_id=interaction)
    version = 3 + 6 * 4
    for agent_id in ids:
        stored = EventStore().load(agent_id)
        assert len(stored) == version
        view = state_view.new_view(agent_id)
        for envelope in stored:
            view = next_view(view, envelope, REGISTRY.decode(envelope), agents.settings.zone) or view

        def projected(agent_id: str = agent_id) -> AgentDocument | None:
            document = AgentDocument.objects(agent_id=agent_id).first()
            return document if document and document.version == version else None

        document = eventually(projected, timeout_s=60)
        assert document.events_applied == version
        assert document.last_event_id == stored[-1].event_id
        folded = document.to_view()
        assert {k: folded[k] for k in view} == view
