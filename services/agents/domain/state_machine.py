"""Agent state changes: the legal transitions and the rules around them.

Presence (logged in, ready, not ready with a reason) is the agent's choice; the
work items (reserved, connected, held, wrapping up) follow routing and the
customer.  The state the world sees is derived from both (see `state_of`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from centralino.v1.agents_pb2 import AgentState, AgentStateChanged, Channel, NotReadyReason, Transition

from services.agents.domain.agent import Agent, apply, state_of
from services.agents.domain.registration import check_identifier
from services.kernel.errors import InvalidField, NotFound, PreconditionFailed

# Reasons an agent may pick; MISSED_OFFER is set by routing through MISS_OFFER.
AGENT_REASONS = frozenset(
    {
        NotReadyReason.BREAK,
        NotReadyReason.LUNCH,
        NotReadyReason.TRAINING,
        NotReadyReason.COACHING,
        NotReadyReason.MEETING,
        NotReadyReason.SYSTEM_ISSUE,
    }
)
EXCLUSIVE_CHANNELS = frozenset({Channel.VOICE, Channel.VIDEO})  # never shared with other work
CLOCK_SKEW = timedelta(seconds=5)


@dataclass(frozen=True)
class ChangeState:
    agent_id: str
    transition: int
    at: datetime
    reason: int = 0
    interaction_id: str = ""
    channel: int = 0
    wrap_up_code: str = ""


def _refuse(agent: Agent, command: ChangeState, why: str) -> PreconditionFailed:
    state = AgentState.Name(state_of(agent))
    action = Transition.Name(command.transition)
    return PreconditionFailed(f"agent {agent.agent_id} is {state}: cannot {action} ({why})", current_state=state)


def check_logged_in(agent: Agent, command: ChangeState) -> None:
    if not agent.logged_in:
        raise _refuse(agent, command, "not logged in")


def check_time(agent: Agent, command: ChangeState, now: datetime) -> None:
    if command.at > now + CLOCK_SKEW:
        raise InvalidField("at", "is in the future")
    if agent.last_change_at and command.at < agent.last_change_at:
        raise InvalidField("at", f"precedes the agent's last change at {agent.last_change_at.isoformat()}")


def check_interaction_phase(agent: Agent, command: ChangeState, *phases: str) -> None:
    check_identifier("interaction_id", command.interaction_id)
    item = agent.item(command.interaction_id)
    if item is None or item.phase not in phases:
        found = item.phase if item else "not held by this agent"
        raise _refuse(agent, command, f"interaction {command.interaction_id} is {found}")


def capacity_problem(agent: Agent, channel: int) -> str:
    """Why the agent cannot take one more interaction on `channel` ("" if they can)."""
    if agent.capacity(channel) == 0:
        return f"the agent does not handle {Channel.Name(channel)}"
    if sum(1 for w in agent.work if w.channel == channel) >= agent.capacity(channel):
        return f"{Channel.Name(channel)} capacity {agent.capacity(channel)} is in use"
    if agent.work and (channel in EXCLUSIVE_CHANNELS or any(w.channel in EXCLUSIVE_CHANNELS for w in agent.work)):
        return "voice and video are never combined with other work"
    return ""


def available_channels(agent: Agent) -> list[int]:
    """Channels on which routing could offer this agent one more interaction now."""
    if not (agent.logged_in and agent.ready):
        return []
    return [channel for channel, _ in agent.channels if not capacity_problem(agent, channel)]


def check_capacity(agent: Agent, command: ChangeState) -> None:
    if problem := capacity_problem(agent, command.channel):
        raise _refuse(agent, command, problem)


def _log_in(agent: Agent, command: ChangeState) -> None:
    if agent.logged_in:
        raise _refuse(agent, command, "already logged in")


def _log_out(agent: Agent, command: ChangeState) -> None:
    check_logged_in(agent, command)
    if agent.work:
        raise _refuse(agent, command, f"{len(agent.work)} interaction(s) in progress")


def _go_ready(agent: Agent, command: ChangeState) -> None:
    check_logged_in(agent, command)
    if agent.ready:
        raise _refuse(agent, command, "already ready")


def _go_not_ready(agent: Agent, command: ChangeState) -> None:
    if command.reason not in AGENT_REASONS:
        names = ", ".join(NotReadyReason.Name(r) for r in sorted(AGENT_REASONS))
        raise InvalidField("reason", f"must be one of {names}")
    check_logged_in(agent, command)
    if not agent.ready and agent.reason == command.reason:
        raise _refuse(agent, command, f"already not ready for {NotReadyReason.Name(command.reason)}")


def _reserve(agent: Agent, command: ChangeState) -> None:
    check_identifier("interaction_id", command.interaction_id)
    if command.channel not in Channel.values() or command.channel == Channel.CHANNEL_UNSPECIFIED:
        raise InvalidField("channel", "must be a known channel")
    check_logged_in(agent, command)
    if not agent.ready:
        raise _refuse(agent, command, "the agent is not ready for new work")
    if agent.item(command.interaction_id):
        raise _refuse(agent, command, f"interaction {command.interaction_id} is already with this agent")
    check_capacity(agent, command)


_CHECKS: dict[int, Callable[[Agent, ChangeState], None]] = {
    Transition.LOG_IN: _log_in,
    Transition.LOG_OUT: _log_out,
    Transition.GO_READY: _go_ready,
    Transition.GO_NOT_READY: _go_not_ready,
    Transition.RESERVE: _reserve,
    Transition.REJECT_OFFER: lambda a, c: check_interaction_phase(a, c, "reserved"),
    Transition.MISS_OFFER: lambda a, c: check_interaction_phase(a, c, "reserved"),
    Transition.CONNECT: lambda a, c: check_interaction_phase(a, c, "reserved"),
    Transition.HOLD: lambda a, c: check_interaction_phase(a, c, "connected"),
    Transition.RESUME: lambda a, c: check_interaction_phase(a, c, "held"),
    Transition.END: lambda a, c: check_interaction_phase(a, c, "connected", "held"),
    Transition.COMPLETE_WRAP_UP: lambda a, c: check_interaction_phase(a, c, "wrap_up"),
}


def change_state(command: ChangeState, agent: Agent, now: datetime) -> list[AgentStateChanged]:
    check_identifier("agent_id", command.agent_id)
    if command.transition not in _CHECKS:
        raise InvalidField("transition", "must be one of " + ", ".join(Transition.Name(t) for t in _CHECKS))
    if not agent.registered:
        raise NotFound(f"agent {command.agent_id} is not registered")
    if len(command.wrap_up_code) > 64:
        raise InvalidField("wrap_up_code", "must be at most 64 characters")
    check_time(agent, command, now)
    _CHECKS[command.transition](agent, command)
    event = AgentStateChanged(
        agent_id=agent.agent_id,
        team_id=agent.team_id,
        transition=cast(Transition, command.transition),
        reason=cast(NotReadyReason, command.reason if command.transition == Transition.GO_NOT_READY else 0),
        interaction_id=command.interaction_id,
        channel=cast(Channel, command.channel if command.transition == Transition.RESERVE else 0),
        wrap_up_code=command.wrap_up_code,
    )
    after = apply(agent, event, command.at)
    event.state = cast(AgentState, state_of(after))
    event.reason = cast(NotReadyReason, after.reason if after.logged_in and not after.ready else 0)
    if command.transition != Transition.RESERVE:
        item = agent.item(command.interaction_id)
        event.channel = cast(Channel, item.channel if item else 0)
    return [event]
