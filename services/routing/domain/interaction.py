"""The Interaction aggregate: one customer contact from creation to wrap-up.

Only a QUEUED interaction can be offered, and only to one agent: with optimistic
concurrency on the aggregate that is what makes a double offer impossible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import cast

from centralino.v1.agents_pb2 import Channel
from centralino.v1.routing_pb2 import (
    Direction,
    InteractionAbandoned,
    InteractionCancelled,
    InteractionCompleted,
    InteractionCreated,
    InteractionEnded,
    InteractionOffered,
    InteractionStatus,
    InteractionTransferred,
    OfferAccepted,
    OfferEnded,
)
from google.protobuf.message import Message

from services.kernel.envelope import epoch_seconds
from services.kernel.errors import InvalidField, NotFound, PreconditionFailed
from services.routing.domain.queues import QueueConfig


class S:
    """The statuses as plain class attributes: protobuf resolves each `InteractionStatus.X`
    through its enum wrapper's `__getattr__`, in Python, and the router reads statuses of
    every open interaction on every pass (about a twentieth of its CPU)."""

    INTERACTION_STATUS_UNSPECIFIED = InteractionStatus.INTERACTION_STATUS_UNSPECIFIED
    QUEUED = InteractionStatus.QUEUED
    OFFERED = InteractionStatus.OFFERED
    CONNECTED = InteractionStatus.CONNECTED
    WRAP_UP = InteractionStatus.WRAP_UP
    COMPLETED = InteractionStatus.COMPLETED
    ABANDONED = InteractionStatus.ABANDONED
    CANCELLED = InteractionStatus.CANCELLED
    Name = InteractionStatus.Name


OPEN = frozenset({S.QUEUED, S.OFFERED, S.CONNECTED, S.WRAP_UP})
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
MAX_ATTRIBUTES = 32
ESCALATION_BOOST = 2  # an escalated customer has waited once already


@dataclass(frozen=True)
class CreateInteraction:
    interaction_id: str
    channel: int
    direction: int
    customer_id: str
    language: str
    department: str
    priority: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Visit:
    """An earlier stay of the interaction in a queue, ended by a transfer or an escalation:
    that queue still counts it (offered, and answered if it was), as supervisors saw it."""

    queue_id: str
    enqueued_at: float | None
    answered_at: float | None


@dataclass(frozen=True)
class Interaction:
    interaction_id: str
    version: int = 0
    status: int = S.INTERACTION_STATUS_UNSPECIFIED
    channel: int = 0
    direction: int = 0
    customer_id: str = ""
    language: str = ""
    department: str = ""
    priority: int = 0
    queue_id: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    agent_id: str = ""  # offered to / connected with
    enqueued_at: float | None = None  # when it first entered its queue (SL, ASA)
    queued_since: float | None = None  # when it last went (back) into the queue
    requeues: int = 0  # ended offers: each puts it back at the front
    answered_at: float | None = None
    closed_at: float | None = None
    expires_at: float | None = None  # of the current offer
    changed_at: float | None = None  # time of the last event
    visits: tuple[Visit, ...] = ()  # earlier queues, oldest first; the current one is queue_id
    target_agent: str = ""  # after a transfer to a named agent
    warm_from: str = ""  # the agent still on the interaction during a warm transfer
    escalated: bool = False
    declined: tuple[tuple[str, float], ...] = ()  # (agent, when) for offers rejected or missed

    @property
    def exists(self) -> bool:
        return self.version > 0


def _refuse(interaction: Interaction, action: str, why: str = "") -> PreconditionFailed:
    status = S.Name(interaction.status)
    detail = f" ({why})" if why else ""
    return PreconditionFailed(
        f"interaction {interaction.interaction_id} is {status}: cannot {action}{detail}", current_state=status
    )


def check_exists(interaction: Interaction) -> None:
    if not interaction.exists:
        raise NotFound(f"interaction {interaction.interaction_id} does not exist")


def check_status(interaction: Interaction, action: str, *allowed: int) -> None:
    check_exists(interaction)
    if interaction.status not in allowed:
        raise _refuse(interaction, action)


def check_agent(interaction: Interaction, agent_id: str, action: str) -> None:
    if interaction.agent_id != agent_id:
        raise _refuse(interaction, action, f"it is with {interaction.agent_id or 'no agent'}, not {agent_id}")


def check_new(command: CreateInteraction) -> None:
    if not _ID.match(command.interaction_id):
        raise InvalidField("interaction_id", "must be 1-128 letters, digits or . _ : @ + -")
    if command.channel not in Channel.values() or command.channel == Channel.CHANNEL_UNSPECIFIED:
        raise InvalidField("channel", "must be one of " + ", ".join(Channel.keys()[1:]))
    if command.direction not in (Direction.INBOUND, Direction.OUTBOUND):
        raise InvalidField("direction", "must be INBOUND or OUTBOUND")
    if not command.customer_id.strip() or len(command.customer_id) > 256:
        raise InvalidField("customer_id", "a phone number, email or social handle is required (max 256)")
    if not 0 <= command.priority <= 10:
        raise InvalidField("priority", "must be between 0 and 10")
    if len(command.attributes) > MAX_ATTRIBUTES:
        raise InvalidField("attributes", f"at most {MAX_ATTRIBUTES} attributes")


def create(command: CreateInteraction, interaction: Interaction, queue: QueueConfig) -> list[Message]:
    check_new(command)
    if interaction.exists:
        return []  # a client retry with the same id: already created, nothing new
    return [
        InteractionCreated(
            interaction_id=command.interaction_id,
            channel=cast(Channel, command.channel),
            direction=cast(Direction, command.direction),
            customer_id=command.customer_id,
            language=command.language,
            department=command.department,
            priority=command.priority,
            attributes=dict(command.attributes),
            queue_id=queue.queue_id,
        )
    ]


def offer(interaction: Interaction, agent_id: str, expires_at: datetime, step: int) -> list[Message]:
    check_status(interaction, "offer", S.QUEUED)
    event = InteractionOffered(interaction_id=interaction.interaction_id, agent_id=agent_id, expansion_step=step)
    event.expires_at.FromDatetime(expires_at)
    return [event]


def end_offer(interaction: Interaction, agent_id: str, outcome: str) -> list[Message]:
    check_status(interaction, outcome.replace("_", " "), S.OFFERED)
    check_agent(interaction, agent_id, outcome.replace("_", " "))
    return [OfferEnded(interaction_id=interaction.interaction_id, agent_id=agent_id, outcome=outcome)]


def repeated(interaction: Interaction, agent_id: str, outcome: int) -> bool:
    """The agent asks again for what it already got: its reply was lost (a timeout, a
    router crash) and the desktop retries.  Nothing to do, and no error to show."""
    return interaction.status == outcome and interaction.agent_id == agent_id


def accept(interaction: Interaction, agent_id: str) -> list[Message]:
    if repeated(interaction, agent_id, S.CONNECTED):
        return []
    check_status(interaction, "accept", S.OFFERED)
    check_agent(interaction, agent_id, "accept")
    return [OfferAccepted(interaction_id=interaction.interaction_id, agent_id=agent_id)]


def end(interaction: Interaction, agent_id: str) -> list[Message]:
    if repeated(interaction, agent_id, S.WRAP_UP):
        return []
    check_status(interaction, "end", S.CONNECTED)
    check_agent(interaction, agent_id, "end")
    return [InteractionEnded(interaction_id=interaction.interaction_id, agent_id=agent_id)]


def complete(interaction: Interaction, agent_id: str, wrap_up_code: str, disposition: str) -> list[Message]:
    if not wrap_up_code.strip() or len(wrap_up_code) > 64:
        raise InvalidField("wrap_up_code", "is required (max 64 characters)")
    if len(disposition) > 64:
        raise InvalidField("disposition", "max 64 characters")
    if repeated(interaction, agent_id, S.COMPLETED):
        return []  # the first wrap-up code stands
    check_status(interaction, "complete", S.WRAP_UP)
    check_agent(interaction, agent_id, "complete")
    return [
        InteractionCompleted(
            interaction_id=interaction.interaction_id,
            agent_id=agent_id,
            wrap_up_code=wrap_up_code,
            disposition=disposition,
        )
    ]


def transfer(
    interaction: Interaction,
    agent_id: str,
    queue: QueueConfig,
    target_agent: str,
    warm: bool,
    escalated: bool = False,
    reason: str = "",
) -> list[Message]:
    action = "escalate" if escalated else "transfer"
    check_status(interaction, action, S.CONNECTED)
    check_agent(interaction, agent_id, action)
    if target_agent == agent_id:
        raise InvalidField("to_agent_id", "cannot transfer to the agent who has it")
    return [
        InteractionTransferred(
            interaction_id=interaction.interaction_id,
            agent_id=agent_id,
            queue_id=queue.queue_id,
            target_agent_id=target_agent,
            warm=warm,
            escalated=escalated,
            reason=reason[:200],
        )
    ]


def abandon(interaction: Interaction, reason: str) -> list[Message]:
    check_status(interaction, "abandon", S.QUEUED, S.OFFERED)
    return [InteractionAbandoned(interaction_id=interaction.interaction_id, reason=reason[:200])]


def cancel(interaction: Interaction, reason: str) -> list[Message]:
    check_status(interaction, "cancel", S.QUEUED, S.OFFERED)
    return [InteractionCancelled(interaction_id=interaction.interaction_id, reason=reason[:200])]


# The phase the assigned agent's work item should be in, for each status (None: not with the agent).
AGENT_PHASE: dict[int, str] = {S.OFFERED: "reserved", S.CONNECTED: "connected", S.WRAP_UP: "wrap_up"}


def apply(interaction: Interaction, event: Message, at: float) -> Interaction:
    i = replace(interaction, version=interaction.version + 1, changed_at=at)
    if isinstance(event, InteractionCreated):
        return replace(
            i,
            status=S.QUEUED,
            channel=event.channel,
            direction=event.direction,
            customer_id=event.customer_id,
            language=event.language,
            department=event.department,
            priority=event.priority,
            queue_id=event.queue_id,
            attributes=dict(event.attributes),
            enqueued_at=at,
            queued_since=at,
        )
    if isinstance(event, InteractionOffered):
        return replace(i, status=S.OFFERED, agent_id=event.agent_id, expires_at=epoch_seconds(event.expires_at))
    if isinstance(event, OfferEnded):
        declined = (*i.declined, (event.agent_id, at)) if event.outcome in ("rejected", "timed_out") else i.declined
        return replace(
            i,
            status=S.QUEUED,
            agent_id="",
            expires_at=None,
            queued_since=at,
            requeues=i.requeues + 1,
            declined=declined,
        )
    if isinstance(event, OfferAccepted):
        return replace(
            i, status=S.CONNECTED, answered_at=i.answered_at or at, expires_at=None, target_agent="", warm_from=""
        )
    if isinstance(event, InteractionTransferred):
        # A new visit to a queue: waiting (and the queue's SL and ASA) start again from here.
        return replace(
            i,
            visits=(*i.visits, Visit(i.queue_id, i.enqueued_at, i.answered_at)),
            status=S.QUEUED,
            queue_id=event.queue_id,
            agent_id="",
            target_agent=event.target_agent_id,
            warm_from=event.agent_id if event.warm else "",
            escalated=i.escalated or event.escalated,
            priority=min(10, i.priority + (ESCALATION_BOOST if event.escalated else 0)),
            enqueued_at=at,
            queued_since=at,
            answered_at=None,
        )
    if isinstance(event, InteractionEnded):
        return replace(i, status=S.WRAP_UP)
    if isinstance(event, InteractionCompleted):
        return replace(i, status=S.COMPLETED, closed_at=at)
    if isinstance(event, InteractionAbandoned):
        return replace(i, status=S.ABANDONED, agent_id="", closed_at=at, expires_at=None, warm_from="")
    if isinstance(event, InteractionCancelled):
        return replace(i, status=S.CANCELLED, agent_id="", closed_at=at, expires_at=None, warm_from="")
    return i


def replay(interaction_id: str, events: Iterable[tuple[Message, datetime]]) -> Interaction:
    interaction = Interaction(interaction_id=interaction_id)
    for event, at in events:
        interaction = apply(interaction, event, at.timestamp())
    return interaction
