"""The agents application against the real database: what it keeps in memory of an agent
(the folded state, the newest events) stays in line with the store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import EventEnvelope

from services.agents import domain
from services.agents.adapters import AGENT_SNAPSHOTS, AgentSnapshots, agent_snapshot
from services.agents.application import AgentsApplication
from services.agents.events import AGENT, REGISTRY, TEAM
from services.kernel import eventstore
from services.kernel.config import Settings
from services.kernel.envelope import Metadata
from services.kernel.errors import PreconditionFailed
from services.kernel.repository import Repository
from services.kernel.snapshots import Snapshot, SnapshotStore

pytestmark = pytest.mark.integration

META = Metadata(correlation_id="c-1", causation_id="cmd-1", producer="test")
T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


class CountingStore(eventstore.EventStore):
    """The real store, counting the events read back."""

    read = 0

    def load_stored(self, aggregate_id: str) -> list[tuple[EventEnvelope, dict[str, str]]]:
        loaded = super().load_stored(aggregate_id)
        self.read += len(loaded)
        return loaded

    def load_after(self, aggregate_id: str, version: int) -> list[EventEnvelope] | None:
        loaded = super().load_after(aggregate_id, version)
        self.read += len(loaded or [])
        return loaded


def application(
    settings: Settings,
    keep_events: int,
    snapshots: AgentSnapshots | None = None,
    store: eventstore.EventStore | None = None,
) -> AgentsApplication:
    store = store or eventstore.EventStore()
    topic = settings.topic("agents")
    agents = Repository(store, REGISTRY, topic, AGENT, keep_events=keep_events)
    teams = Repository(store, REGISTRY, topic, TEAM, keep_events=keep_events)
    clock = lambda: T0 + timedelta(hours=1)  # noqa: E731
    return AgentsApplication(agents, teams, clock=clock, snapshots=snapshots, snapshot_every=5)


def work_a_shift(app: AgentsApplication, interactions: int = 5) -> int:
    """Registration, log-in, ready, then whole interactions; returns how many events."""
    app.create_team(domain.CreateTeam("t1", "Team 1", "sup-1"), META)
    app.register_agent(domain.RegisterAgent("a1", "Anna", "t1", pb.CONSULTANT, (), ((pb.CHAT, 2),)), META)
    steps = [(pb.LOG_IN, ""), (pb.GO_READY, "")]
    for n in range(interactions):
        steps += [(t, f"i{n}") for t in (pb.RESERVE, pb.CONNECT, pb.END, pb.COMPLETE_WRAP_UP)]
    for second, (transition, iid) in enumerate(steps):
        at = T0 + timedelta(seconds=second, microseconds=123_457)  # microseconds survive a snapshot
        app.change_state(domain.ChangeState("a1", transition, at, interaction_id=iid, channel=pb.CHAT), META)
    return 1 + len(steps)


def whole_history(agent_id: str) -> domain.Agent:
    history = eventstore.EventStore().load(agent_id)
    return domain.replay(agent_id, [(REGISTRY.decode(e), e.occurred_at.ToDatetime(tzinfo=UTC)) for e in history])


def test_an_agent_with_a_long_history_is_folded_from_its_newest_events(mongo: Settings) -> None:
    eventstore.ensure_indexes()
    app = application(mongo, keep_events=2)
    events = work_a_shift(app)  # 20 events past what the cache keeps

    # Another process changes the agent: the first reads only what it has not folded yet.
    other = application(mongo, keep_events=2)
    at = T0 + timedelta(minutes=events)
    other.change_state(domain.ChangeState("a1", pb.RESERVE, at, interaction_id="i-other", channel=pb.CHAT), META)
    at += timedelta(minutes=1)
    app.change_state(domain.ChangeState("a1", pb.RESERVE, at, interaction_id="i-mine", channel=pb.CHAT), META)

    whole = whole_history("a1")
    assert whole.version == events + 2
    assert app._agent("a1") == whole
    assert [w.interaction_id for w in whole.work] == ["i-other", "i-mine"]
    # The other process's cache is behind: its write loses the race, and is decided
    # again on the fresh state, where both chats are taken.
    with pytest.raises(PreconditionFailed, match="capacity"):
        other.change_state(domain.ChangeState("a1", pb.RESERVE, at, interaction_id="i-3", channel=pb.CHAT), META)
    assert other._agent("a1") == whole


def test_a_restarted_process_reads_an_agent_from_its_snapshot_and_the_events_after_it(mongo: Settings) -> None:
    eventstore.ensure_indexes()
    snapshots = AgentSnapshots()
    events = work_a_shift(application(mongo, keep_events=2, snapshots=snapshots))
    assert snapshots.store.flush()
    stored = snapshots.store.load("a1")
    assert events == 23 and stored is not None and stored.version == 20  # every 5 events

    store = CountingStore()
    restarted = application(mongo, keep_events=2, snapshots=AgentSnapshots(), store=store)
    assert restarted._agent("a1") == whole_history("a1")
    assert store.read == 3  # 21, 22 and 23, not the whole history
    at = T0 + timedelta(minutes=5)
    restarted.change_state(domain.ChangeState("a1", pb.RESERVE, at, interaction_id="i9", channel=pb.CHAT), META)
    assert restarted._agent("a1") == whole_history("a1")


def test_a_snapshot_of_another_format_or_ahead_of_the_events_is_not_used(mongo: Settings) -> None:
    eventstore.ensure_indexes()
    events = work_a_shift(application(mongo, keep_events=2, snapshots=AgentSnapshots()))
    whole = whole_history("a1")
    other_format = AgentSnapshots(SnapshotStore(AGENT_SNAPSHOTS, format=99))
    store = CountingStore()
    assert application(mongo, 2, other_format, store)._agent("a1") == whole
    assert store.read == events  # folded from its events: the snapshot is another release's

    # A snapshot past the agent's events (not this agent's history) is not built on.
    ahead = agent_snapshot(whole)
    SnapshotStore(AGENT_SNAPSHOTS, format=AgentSnapshots().store.format).save(
        "a1", Snapshot(events + 50, {**ahead.state, "name": "not Anna"})
    )
    store = CountingStore()
    assert application(mongo, 2, AgentSnapshots(), store)._agent("a1") == whole
    assert store.read == events
