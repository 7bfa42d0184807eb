"""Every legal and illegal agent state transition, as pure domain rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.agents_pb2 import AgentState as S
from centralino.v1.agents_pb2 import Transition as T

from services.agents import domain
from services.agents.domain.agent import Agent
from services.kernel.errors import InvalidField, NotFound, PreconditionFailed

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=30)
PROFILE = domain.RegisterAgent(
    agent_id="a1",
    name="Anna",
    team_id="t1",
    seniority=pb.CONSULTANT,
    skills=(("customer_service", 4),),
    channels=((pb.VOICE, 1), (pb.CHAT, 3), (pb.EMAIL, 2)),
)


def registered() -> Agent:
    return domain.replay("a1", domain.register_agent(PROFILE, Agent(agent_id="a1")))


def step(agent: Agent, transition: int, offset_s: int = 0, **fields: object) -> Agent:
    command = domain.ChangeState(agent_id="a1", transition=transition, at=T0 + timedelta(seconds=offset_s), **fields)  # type: ignore[arg-type]
    [event] = domain.change_state(command, agent, NOW)
    after = domain.apply(agent, event, command.at)
    assert event.state == domain.state_of(after)
    return after


def walk(*steps: tuple) -> Agent:
    agent = registered()
    for offset, (transition, fields) in enumerate(steps):
        agent = step(agent, transition, offset, **fields)
    return agent


Step = tuple[int, dict[str, Any]]
LOGIN: Step = (T.LOG_IN, {})
READY: Step = (T.GO_READY, {})
RESERVE_CALL: Step = (T.RESERVE, {"interaction_id": "i1", "channel": pb.VOICE})
CONNECT: Step = (T.CONNECT, {"interaction_id": "i1"})


# (path leading to a state, the state it must be in)
PATHS = {
    "logged out": ((), S.LOGGED_OUT),
    "not ready": ((LOGIN,), S.NOT_READY),
    "ready": ((LOGIN, READY), S.READY),
    "on break": ((LOGIN, (T.GO_NOT_READY, {"reason": pb.BREAK})), S.NOT_READY),
    "reserved": ((LOGIN, READY, RESERVE_CALL), S.RESERVED),
    "busy": ((LOGIN, READY, RESERVE_CALL, CONNECT), S.BUSY),
    "held": ((LOGIN, READY, RESERVE_CALL, CONNECT, (T.HOLD, {"interaction_id": "i1"})), S.BUSY),
    "wrap up": ((LOGIN, READY, RESERVE_CALL, CONNECT, (T.END, {"interaction_id": "i1"})), S.AFTER_CALL_WORK),
}

# For every state, which transitions are legal (with the state they lead to); all others are refused.
LEGAL: dict[str, dict[int, int]] = {
    "logged out": {T.LOG_IN: S.NOT_READY},
    "not ready": {T.GO_READY: S.READY, T.GO_NOT_READY: S.NOT_READY, T.LOG_OUT: S.LOGGED_OUT},
    "ready": {T.GO_NOT_READY: S.NOT_READY, T.LOG_OUT: S.LOGGED_OUT, T.RESERVE: S.RESERVED},
    "on break": {T.GO_READY: S.READY, T.GO_NOT_READY: S.NOT_READY, T.LOG_OUT: S.LOGGED_OUT},
    "reserved": {T.CONNECT: S.BUSY, T.REJECT_OFFER: S.READY, T.MISS_OFFER: S.NOT_READY, T.GO_NOT_READY: S.RESERVED},
    "busy": {T.HOLD: S.BUSY, T.END: S.AFTER_CALL_WORK, T.GO_NOT_READY: S.BUSY},
    "held": {T.RESUME: S.BUSY, T.END: S.AFTER_CALL_WORK, T.GO_NOT_READY: S.BUSY},
    "wrap up": {T.COMPLETE_WRAP_UP: S.READY, T.GO_NOT_READY: S.AFTER_CALL_WORK},
}

ARGS: dict[int, dict[str, Any]] = {
    T.GO_NOT_READY: {"reason": pb.LUNCH},
    T.RESERVE: {"interaction_id": "i2", "channel": pb.CHAT},
    **{t: {"interaction_id": "i1"} for t in (T.REJECT_OFFER, T.MISS_OFFER, T.CONNECT, T.HOLD, T.RESUME, T.END)},
    T.COMPLETE_WRAP_UP: {"interaction_id": "i1", "wrap_up_code": "resolved"},
}
ALL = [t for t in T.values() if t != T.TRANSITION_UNSPECIFIED]


@pytest.mark.parametrize("name", PATHS)
def test_paths_reach_their_state(name: str) -> None:
    steps, state = PATHS[name]
    assert domain.state_of(walk(*steps)) == state


@pytest.mark.parametrize(("name", "transition"), [(n, t) for n in PATHS for t in ALL])
def test_every_transition_from_every_state(name: str, transition: int) -> None:
    steps, state = PATHS[name]
    agent = walk(*steps)
    fields = dict(ARGS.get(transition, {}))
    if name == "ready" and transition == T.RESERVE:
        fields["channel"] = pb.VOICE
    expected = LEGAL[name].get(transition)
    if expected is None:
        with pytest.raises(PreconditionFailed) as refused:
            step(agent, transition, 100, **fields)
        assert refused.value.details == {"current-state": S.Name(state)}
        assert S.Name(state) in str(refused.value)
    else:
        assert domain.state_of(step(agent, transition, 100, **fields)) == expected


def test_missed_offer_makes_the_agent_not_ready_for_missed_offer() -> None:
    agent = walk(LOGIN, READY, RESERVE_CALL, (T.MISS_OFFER, {"interaction_id": "i1"}))
    assert (domain.state_of(agent), agent.reason, agent.work) == (S.NOT_READY, pb.MISSED_OFFER, ())


def test_chats_stack_up_to_capacity_but_never_under_a_call() -> None:
    agent = walk(LOGIN, READY)
    for n in range(3):
        agent = step(agent, T.RESERVE, 10 + n, interaction_id=f"c{n}", channel=pb.CHAT)
    with pytest.raises(PreconditionFailed, match="CHAT capacity 3 is in use"):
        step(agent, T.RESERVE, 20, interaction_id="c9", channel=pb.CHAT)
    with pytest.raises(PreconditionFailed, match="voice and video are never combined"):
        step(agent, T.RESERVE, 20, interaction_id="v1", channel=pb.VOICE)
    assert domain.state_of(step(agent, T.RESERVE, 20, interaction_id="e1", channel=pb.EMAIL)) == S.RESERVED


def test_a_call_blocks_every_other_channel_and_unknown_channels_are_refused() -> None:
    agent = walk(LOGIN, READY, RESERVE_CALL)
    with pytest.raises(PreconditionFailed, match="never combined"):
        step(agent, T.RESERVE, 10, interaction_id="c1", channel=pb.CHAT)
    with pytest.raises(PreconditionFailed, match="does not handle SMS"):
        step(walk(LOGIN, READY), T.RESERVE, 10, interaction_id="s1", channel=pb.SMS)


def test_not_ready_while_busy_takes_effect_when_the_work_is_done() -> None:
    agent = walk(LOGIN, READY, RESERVE_CALL, CONNECT, (T.GO_NOT_READY, {"reason": pb.BREAK}))
    assert domain.state_of(agent) == S.BUSY
    agent = step(agent, T.END, 10, interaction_id="i1")
    agent = step(agent, T.COMPLETE_WRAP_UP, 11, interaction_id="i1")
    assert (domain.state_of(agent), agent.reason) == (S.NOT_READY, pb.BREAK)
    with pytest.raises(PreconditionFailed, match="not ready for new work"):
        step(agent, T.RESERVE, 12, interaction_id="i2", channel=pb.VOICE)


def test_malformed_or_out_of_order_commands_name_the_field() -> None:
    agent = walk(LOGIN, READY)
    cases = [
        ({"transition": T.GO_NOT_READY, "reason": pb.MISSED_OFFER}, "reason"),
        ({"transition": T.GO_NOT_READY}, "reason"),
        ({"transition": T.RESERVE, "interaction_id": "", "channel": pb.CHAT}, "interaction_id"),
        ({"transition": T.RESERVE, "interaction_id": "x", "channel": 0}, "channel"),
        ({"transition": 0}, "transition"),
        ({"transition": T.COMPLETE_WRAP_UP, "interaction_id": "i1", "wrap_up_code": "x" * 65}, "wrap_up_code"),
    ]
    for fields, field in cases:
        with pytest.raises(InvalidField) as error:
            domain.change_state(domain.ChangeState(agent_id="a1", at=T0 + timedelta(hours=1), **fields), agent, NOW)  # type: ignore[arg-type]
        assert error.value.field == field
    with pytest.raises(InvalidField, match="precedes") as early:
        domain.change_state(domain.ChangeState("a1", T.GO_NOT_READY, T0 - timedelta(seconds=1), pb.BREAK), agent, NOW)
    assert early.value.field == "at"
    with pytest.raises(InvalidField, match="future"):
        domain.change_state(domain.ChangeState("a1", T.GO_NOT_READY, NOW + timedelta(minutes=1), pb.BREAK), agent, NOW)


def test_unknown_agents_are_not_found() -> None:
    with pytest.raises(NotFound):
        domain.change_state(domain.ChangeState("ghost", T.LOG_IN, T0), Agent(agent_id="ghost"), NOW)
