"""Pure domain rules of the agent aggregate."""

from __future__ import annotations

import pytest
from centralino.v1 import agents_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from services.agents import domain
from services.kernel.errors import AlreadyExists, InvalidField

VALID = domain.RegisterAgent(
    agent_id="anna.rossi",
    name="Anna Rossi",
    team_id="team-1",
    seniority=pb.CONSULTANT,
    skills=(("customer_service", 4), ("lang:it", 5)),
    channels=((pb.VOICE, 1), (pb.CHAT, 3)),
)


def refused_field(**changes: object) -> str:
    command = domain.RegisterAgent(**{**VALID.__dict__, **changes})
    with pytest.raises(InvalidField) as error:
        domain.register_agent(command, domain.Agent(agent_id=command.agent_id))
    return error.value.field


def test_registration_produces_one_event_with_every_field() -> None:
    [event] = domain.register_agent(VALID, domain.Agent(agent_id="anna.rossi"))
    assert isinstance(event, pb.AgentRegistered)
    assert (event.agent_id, event.name, event.team_id, event.seniority) == ("anna.rossi", "Anna Rossi", "team-1", 2)
    assert [(s.name, s.proficiency) for s in event.skills] == [("customer_service", 4), ("lang:it", 5)]
    assert [(c.channel, c.max_concurrent) for c in event.channels] == [(pb.VOICE, 1), (pb.CHAT, 3)]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"agent_id": ""}, "agent_id"),
        ({"agent_id": "has space"}, "agent_id"),
        ({"name": "  "}, "name"),
        ({"team_id": ""}, "team_id"),
        ({"seniority": 0}, "seniority"),
        ({"seniority": 42}, "seniority"),
        ({"skills": (("sales", 0),)}, "skills[0].proficiency"),
        ({"skills": (("sales", 3), ("sales", 4))}, "skills[1].name"),
        ({"channels": ()}, "channels"),
        ({"channels": ((pb.VOICE, 2),)}, "channels[0].max_concurrent"),
        ({"channels": ((pb.CHAT, 3), (pb.CHAT, 2))}, "channels[1].channel"),
        ({"channels": ((99, 1),)}, "channels[0].channel"),
    ],
)
def test_malformed_commands_name_the_field(changes: dict[str, object], field: str) -> None:
    assert refused_field(**changes) == field


def test_an_agent_registers_once() -> None:
    agent = domain.replay("anna.rossi", domain.register_agent(VALID, domain.Agent(agent_id="anna.rossi")))
    assert (agent.version, agent.registered, agent.name) == (1, True, "Anna Rossi")
    with pytest.raises(AlreadyExists):
        domain.register_agent(VALID, agent)


def test_a_registration_stopped_between_its_two_writes_is_finished_by_a_retry() -> None:
    agent = domain.replay("anna.rossi", domain.register_agent(VALID, domain.Agent(agent_id="anna.rossi")))
    team = domain.Team("team-1", version=1, exists=True)
    assert domain.registration_interrupted(VALID, agent, team)  # registered, the team never heard of it
    joined = domain.Team("team-1", version=2, exists=True, members=frozenset({"anna.rossi"}))
    assert not domain.registration_interrupted(VALID, agent, joined)  # complete: a retry is AlreadyExists
    elsewhere = domain.RegisterAgent(**{**VALID.__dict__, "team_id": "team-2"})
    assert not domain.registration_interrupted(elsewhere, agent, domain.Team("team-2", exists=True))
    never = domain.Agent(agent_id="anna.rossi")
    assert not domain.registration_interrupted(VALID, never, team)  # a first registration


@given(st.integers(min_value=-10, max_value=20))
def test_proficiency_is_accepted_exactly_from_1_to_5(proficiency: int) -> None:
    command = domain.RegisterAgent(**{**VALID.__dict__, "skills": (("sales", proficiency),)})
    if 1 <= proficiency <= 5:
        assert domain.register_agent(command, domain.Agent(agent_id=command.agent_id))
    else:
        with pytest.raises(InvalidField):
            domain.register_agent(command, domain.Agent(agent_id=command.agent_id))
