"""Queue KPIs as the industry computes them (see shared/reference/kpi-definitions.md).

Vendors disagree on service level, so the variant is a setting:
- "answered" (Asterisk SL): answered within T / answered;
- "answered_and_abandoned" (Genesys Cloud, the default): answered within T / (answered + abandoned);
- "left_queue" (Amazon Connect): contacts leaving the queue within T (answered or
  abandoned) / contacts that left the queue.
Abandons shorter than the queue's short-abandon threshold leave numerator and
denominator of service level and abandonment rate, except in "left_queue",
where by Amazon Connect's definition a short abandon meets the target.

Each visit to a queue counts in that queue: a transferred interaction stays offered
(and answered, with its speed of answer) in the queue it left, and is offered anew in
the queue it went to, its wait there counted from the transfer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.routing.domain.interaction import Interaction, S, Visit
from services.routing.domain.queues import QueueConfig

SL_VARIANTS = ("answered", "answered_and_abandoned", "left_queue")


@dataclass(frozen=True)
class QueueKpis:
    queue_id: str
    waiting: int
    longest_wait_s: float
    offered: int
    answered: int
    abandoned: int
    service_level: float
    average_speed_of_answer_s: float
    abandonment_rate: float


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _visits(interactions: Iterable[Interaction], queue_id: str) -> tuple[list[Interaction], list[Visit]]:
    """The interactions now in the queue (cancelled ones left out), and the earlier visits
    to it of interactions that moved on."""
    current, earlier = [], []
    for i in interactions:
        if i.queue_id == queue_id and i.status != S.CANCELLED:
            current.append(i)
        earlier += [visit for visit in i.visits if visit.queue_id == queue_id]
    return current, earlier


def queue_kpis(interactions: Iterable[Interaction], queue: QueueConfig, now: float, variant: str) -> QueueKpis:
    mine, moved_on = _visits(interactions, queue.queue_id)
    threshold = queue.sla_threshold_s
    waiting = [i for i in mine if i.status in (S.QUEUED, S.OFFERED)]
    answered = [i for i in mine if i.answered_at is not None]
    answered_and_moved_on = [v for v in moved_on if v.answered_at is not None]
    abandons = [i for i in mine if i.status == S.ABANDONED]
    waits = {i.interaction_id: (i.closed_at or now) - (i.enqueued_at or now) for i in abandons}
    short = [i for i in abandons if waits[i.interaction_id] < queue.short_abandon_s]
    counted_abandons = [i for i in abandons if i not in short]
    answer_waits = [(i.answered_at or 0) - (i.enqueued_at or 0) for i in answered]
    answer_waits += [(v.answered_at or 0) - (v.enqueued_at or 0) for v in answered_and_moved_on]
    within = sum(1 for wait in answer_waits if wait <= threshold)
    answered_count = len(answer_waits)
    if variant == "answered":
        service_level = _ratio(within, answered_count)
    elif variant == "answered_and_abandoned":
        service_level = _ratio(within, answered_count + len(counted_abandons))
    elif variant == "left_queue":
        left_within = within + sum(1 for i in abandons if waits[i.interaction_id] <= threshold)
        service_level = _ratio(left_within, answered_count + len(abandons))
    else:
        raise ValueError(f"service level variant must be one of {', '.join(SL_VARIANTS)}")
    return QueueKpis(
        queue_id=queue.queue_id,
        waiting=len(waiting),
        longest_wait_s=max((now - (i.enqueued_at or now) for i in waiting), default=0.0),
        offered=len(mine) + len(moved_on),
        answered=answered_count,
        abandoned=len(counted_abandons),
        service_level=service_level,
        average_speed_of_answer_s=_ratio(sum(answer_waits), answered_count),
        abandonment_rate=_ratio(len(counted_abandons), len(mine) + len(moved_on) - len(short)),
    )
