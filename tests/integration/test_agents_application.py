"""The agents application against the real database: what it keeps in memory of an agent
(the folded state, the newest events) stays in line with the store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from centralino.v1 import agents_pb2 as pb

from services.agents import domain
from services.agents.application import AgentsApplication
from services.agents.events import AGENT, REGISTRY, TEAM
from services.kernel import eventstore
from services.kernel.config import Settings
from services.kernel.envelope import Metadata
from services.kernel.errors import PreconditionFailed
from services.kernel.repository import Repository

pytestmark = pytest.mark.integration

META = Metadata(correlation_id="c-1", causation_id="cmd-1", producer="test")
T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def application(settings: Settings, keep_events: int) -> AgentsApplication:
    store = eventstore.EventStore()
    topic = settings.topic("agents")
    agents = Repository(store, REGISTRY, topic, AGENT, keep_events=keep_events)
    teams = Repository(store, REGISTRY, topic, TEAM, keep_events=keep_events)
    return AgentsApplication(agents, teams, clock=lambda: T0 + timedelta(hours=1))


def test_an_agent_with_a_long_history_is_folded_from_its_newest_events(mongo: Settings) -> None:
    eventstore.ensure_indexes()
    app = application(mongo, keep_events=2)
    app.create_team(domain.CreateTeam("t1", "Team 1", "sup-1"), META)
    app.register_agent(domain.RegisterAgent("a1", "Anna", "t1", pb.CONSULTANT, (), ((pb.CHAT, 2),)), META)
    steps = [(pb.LOG_IN, ""), (pb.GO_READY, "")]
    for n in range(5):  # 20 events past what the cache keeps
        steps += [(t, f"i{n}") for t in (pb.RESERVE, pb.CONNECT, pb.END, pb.COMPLETE_WRAP_UP)]
    for minute, (transition, iid) in enumerate(steps):
        at = T0 + timedelta(minutes=minute)
        app.change_state(domain.ChangeState("a1", transition, at, interaction_id=iid, channel=pb.CHAT), META)

    # Another process changes the agent: the first reads only what it has not folded yet.
    other = application(mongo, keep_events=2)
    at = T0 + timedelta(minutes=len(steps))
    other.change_state(domain.ChangeState("a1", pb.RESERVE, at, interaction_id="i-other", channel=pb.CHAT), META)
    at += timedelta(minutes=1)
    app.change_state(domain.ChangeState("a1", pb.RESERVE, at, interaction_id="i-mine", channel=pb.CHAT), META)

    history = eventstore.EventStore().load("a1")
    whole = domain.replay("a1", [(REGISTRY.decode(e), e.occurred_at.ToDatetime(tzinfo=UTC)) for e in history])
    assert len(history) == 1 + len(steps) + 2
    assert app._agent("a1") == whole
    assert [w.interaction_id for w in whole.work] == ["i-other", "i-mine"]
    # The other process's cache is behind: its write loses the race, and is decided
    # again on the fresh state, where both chats are taken.
    with pytest.raises(PreconditionFailed, match="capacity"):
        other.change_state(domain.ChangeState("a1", pb.RESERVE, at, interaction_id="i-3", channel=pb.CHAT), META)
    assert other._agent("a1") == whole
