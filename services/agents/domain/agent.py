"""The Agent aggregate's state, rebuilt by folding its events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from centralino.v1.agents_pb2 import (
    AgentMovedToTeam,
    AgentRegistered,
    AgentState,
    AgentStateChanged,
    NotReadyReason,
    ShiftScheduled,
    Transition,
)
from google.protobuf.message import Message


@dataclass(frozen=True)
class WorkItem:
    interaction_id: str
    channel: int
    phase: str  # "reserved" | "connected" | "held" | "wrap_up"


@dataclass(frozen=True)
class Agent:
    agent_id: str
    version: int = 0
    registered: bool = False
    name: str = ""
    team_id: str = ""
    channels: tuple[tuple[int, int], ...] = ()  # (channel, max concurrent)
    logged_in: bool = False
    ready: bool = False  # presence chosen by the agent; derived state may still be BUSY
    reason: int = NotReadyReason.NOT_READY_REASON_UNSPECIFIED
    work: tuple[WorkItem, ...] = ()
    last_change_at: datetime | None = None
    shifts: frozenset[str] = field(default_factory=frozenset)

    def capacity(self, channel: int) -> int:
        return dict(self.channels).get(channel, 0)

    def item(self, interaction_id: str) -> WorkItem | None:
        return next((w for w in self.work if w.interaction_id == interaction_id), None)


def state_of(agent: Agent) -> int:
    """The state everyone sees: interactions in progress outrank the agent's presence."""
    if not agent.logged_in:
        return AgentState.LOGGED_OUT
    phases = {w.phase for w in agent.work}
    if phases & {"connected", "held"}:
        return AgentState.BUSY
    if "wrap_up" in phases:
        return AgentState.AFTER_CALL_WORK
    if "reserved" in phases:
        return AgentState.RESERVED
    return AgentState.READY if agent.ready else AgentState.NOT_READY


def _with_work(agent: Agent, interaction_id: str, phase: str | None, channel: int = 0) -> Agent:
    """Set (or with phase None, drop) one work item, keeping the others in order."""
    current = agent.item(interaction_id)
    others = tuple(w for w in agent.work if w.interaction_id != interaction_id)
    if phase is None:
        return replace(agent, work=others)
    item = WorkItem(interaction_id, channel or (current.channel if current else 0), phase)
    if current is None:
        return replace(agent, work=(*agent.work, item))
    return replace(agent, work=tuple(item if w.interaction_id == interaction_id else w for w in agent.work))


_PHASE_AFTER = {
    Transition.RESERVE: "reserved",
    Transition.CONNECT: "connected",
    Transition.HOLD: "held",
    Transition.RESUME: "connected",
    Transition.END: "wrap_up",
    Transition.REJECT_OFFER: None,
    Transition.MISS_OFFER: None,
    Transition.COMPLETE_WRAP_UP: None,
}


def _changed(agent: Agent, event: AgentStateChanged) -> Agent:
    t = event.transition
    if t == Transition.LOG_IN:
        return replace(agent, logged_in=True, ready=False, reason=NotReadyReason.NOT_READY_REASON_UNSPECIFIED)
    if t == Transition.LOG_OUT:
        return replace(agent, logged_in=False, ready=False, work=())
    if t == Transition.GO_READY:
        return replace(agent, ready=True, reason=NotReadyReason.NOT_READY_REASON_UNSPECIFIED)
    if t == Transition.GO_NOT_READY:
        return replace(agent, ready=False, reason=event.reason)
    agent = _with_work(agent, event.interaction_id, _PHASE_AFTER[t], event.channel)
    if t == Transition.MISS_OFFER:
        agent = replace(agent, ready=False, reason=NotReadyReason.MISSED_OFFER)
    return agent


def apply(agent: Agent, event: Message, at: datetime | None = None) -> Agent:
    agent = replace(agent, version=agent.version + 1)
    if at is not None and isinstance(event, AgentStateChanged):  # profile changes do not order state changes
        agent = replace(agent, last_change_at=at)
    if isinstance(event, AgentRegistered):
        channels = tuple((c.channel, c.max_concurrent) for c in event.channels)
        return replace(agent, registered=True, name=event.name, team_id=event.team_id, channels=channels)
    if isinstance(event, AgentStateChanged):
        return _changed(agent, event)
    if isinstance(event, AgentMovedToTeam):
        return replace(agent, team_id=event.team_id)
    if isinstance(event, ShiftScheduled):
        return replace(agent, shifts=agent.shifts | {event.shift_id})
    return agent


def replay(agent_id: str, events: Iterable[Message | tuple[Message, datetime]]) -> Agent:
    """Fold events (optionally paired with when they happened) into the current state."""
    agent = Agent(agent_id=agent_id)
    for item in events:
        event, at = item if isinstance(item, tuple) else (item, None)
        agent = apply(agent, event, at)
    return agent
