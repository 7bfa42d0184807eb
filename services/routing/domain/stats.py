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

Every figure but the live ones (waiting, longest wait) is a sum over visits, so it is
kept as a running `Tally` per queue and day: the router adds an interaction's share
when it changes and takes its earlier share back (`DayTallies.count`), and never has
to keep, or walk through, the interactions that have closed.  A visit counts in the
day it entered the queue, in the contact center's time zone (as Genesys Cloud counts
a conversation in the interval it started): an interaction queued before midnight and
answered after it is part of the day before.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

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


class Tally(NamedTuple):
    """What a queue's visits add up to.  Integers only (waits in microseconds), so taking
    a share back leaves exactly what was there before it was added.  A named tuple: the
    router makes a few for every change of an interaction."""

    offered: int = 0
    answered: int = 0
    answered_within: int = 0  # answered within the queue's service-level threshold
    answer_wait_us: int = 0
    abandoned: int = 0  # not counting the short abandons
    short_abandoned: int = 0
    abandoned_within: int = 0  # abandons (short ones too) that left within the threshold

    def plus(self, other: Tally) -> Tally:
        return Tally._make(map(operator.add, self, other))

    def minus(self, other: Tally) -> Tally:
        return Tally._make(map(operator.sub, self, other))


Share = tuple[str, float, Tally]  # queue id, when the visit entered it, what it adds


def shares(interaction: Interaction, queues: Mapping[str, QueueConfig]) -> list[Share]:
    """What the interaction adds to the queues it visited (a cancelled one's current
    visit adds nothing: the contact was withdrawn, not offered)."""
    out = []
    for visit in interaction.visits:
        if (queue := queues.get(visit.queue_id)) is not None:
            enqueued = visit.enqueued_at or 0.0
            out.append((visit.queue_id, enqueued, _visit(queue, enqueued, visit.answered_at, None)))
    current = queues.get(interaction.queue_id)
    if current is not None and interaction.status != S.CANCELLED and interaction.exists:
        enqueued = interaction.enqueued_at or 0.0
        abandoned_at = (interaction.closed_at or enqueued) if interaction.status == S.ABANDONED else None
        out.append((interaction.queue_id, enqueued, _visit(current, enqueued, interaction.answered_at, abandoned_at)))
    return out


def _visit(queue: QueueConfig, enqueued_at: float, answered_at: float | None, abandoned_at: float | None) -> Tally:
    """One visit's share: offered, and answered or abandoned (short or not) if it was."""
    threshold = queue.sla_threshold_s
    if answered_at is not None:
        wait = answered_at - enqueued_at
        return Tally(1, 1, int(wait <= threshold), round(wait * 1e6))
    if abandoned_at is not None:
        wait = abandoned_at - enqueued_at
        short = wait < queue.short_abandon_s
        return Tally(1, abandoned=int(not short), short_abandoned=int(short), abandoned_within=int(wait <= threshold))
    return Tally(1)


def _counted(interaction: Interaction) -> tuple[object, ...]:
    """What an interaction's shares depend on (with the queues' settings)."""
    outcome = interaction.status if interaction.status in (S.ABANDONED, S.CANCELLED) else 0
    return (outcome, interaction.queue_id, interaction.enqueued_at, interaction.answered_at, interaction.visits)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def service_level(tally: Tally, variant: str) -> float:
    if variant == "answered":
        return _ratio(tally.answered_within, tally.answered)
    if variant == "answered_and_abandoned":
        return _ratio(tally.answered_within, tally.answered + tally.abandoned)
    if variant == "left_queue":
        left = tally.answered + tally.abandoned + tally.short_abandoned
        return _ratio(tally.answered_within + tally.abandoned_within, left)
    raise ValueError(f"service level variant must be one of {', '.join(SL_VARIANTS)}")


def kpis(queue: QueueConfig, tally: Tally, waiting: Iterable[Interaction], now: float, variant: str) -> QueueKpis:
    """The queue's KPIs from its tally and the interactions waiting in it now."""
    waits = [now - (i.enqueued_at or now) for i in waiting]
    return QueueKpis(
        queue_id=queue.queue_id,
        waiting=len(waits),
        longest_wait_s=max(waits, default=0.0),
        offered=tally.offered,
        answered=tally.answered,
        abandoned=tally.abandoned,
        service_level=service_level(tally, variant),
        average_speed_of_answer_s=_ratio(tally.answer_wait_us / 1e6, tally.answered),
        abandonment_rate=_ratio(tally.abandoned, tally.offered - tally.short_abandoned),
    )


def is_waiting(interaction: Interaction, queue_id: str) -> bool:
    return interaction.queue_id == queue_id and interaction.status in (S.QUEUED, S.OFFERED)


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
    """The KPIs of every visit of `interactions` to the queue, whatever the day, by walking
    them all: the definition the running tallies are checked against (tests, bench)."""
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


class DayTallies:
    """Each queue's tally per day (by the enqueue time of each visit), from the current
    day on.

    `count(before, after, now)` keeps them in step with one interaction's change.  Days
    before the current one are dropped, and a share of a dropped day is neither added nor
    taken back later, so what remains is always exact."""

    def __init__(self, queues: Mapping[str, QueueConfig], tz: ZoneInfo) -> None:
        self._queues = queues
        self._tz = tz
        self._today: date | None = None
        self._tallies: dict[tuple[date, str], Tally] = {}
        self._known = (0.0, 0.0, date.min)  # a day's [start, end) as timestamps, and the day

    def _day_of(self, at: float) -> date:
        start, end, day = self._known
        if start <= at < end:  # nearly always: time zone arithmetic only once a day
            return day
        day = datetime.fromtimestamp(at, self._tz).date()
        start = datetime.combine(day, datetime.min.time(), self._tz).timestamp()
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), self._tz).timestamp()
        self._known = (start, end, day)
        return day

    def advance(self, now: float) -> date:
        """Move to the day of `now`, dropping the days before it."""
        today = self._day_of(now)
        if self._today is None or today > self._today:
            self._today = today
            self._tallies = {key: tally for key, tally in self._tallies.items() if key[0] >= today}
        return self._today

    def count(self, before: Interaction | None, after: Interaction | None, now: float) -> None:
        if before is not None and after is not None and _counted(before) == _counted(after):
            return  # most changes (offered, ended, completed) leave the figures as they were
        today = self.advance(now)
        for interaction, sign in ((before, -1), (after, 1)):
            if interaction is None:
                continue
            for queue_id, enqueued_at, share in shares(interaction, self._queues):
                key = (self._day_of(enqueued_at), queue_id)
                if key[0] >= today:
                    kept = self._tallies.get(key, Tally())
                    self._tallies[key] = kept.plus(share) if sign > 0 else kept.minus(share)

    def today(self, queue_id: str, now: float) -> tuple[date, Tally]:
        today = self.advance(now)
        return today, self._tallies.get((today, queue_id), Tally())

    def copy(self) -> DayTallies:
        twin = DayTallies(self._queues, self._tz)
        twin._today, twin._tallies, twin._known = self._today, dict(self._tallies), self._known
        return twin

    def rows(self) -> list[dict[str, str | int]]:
        """The tallies as plain documents: day (ISO), queue id and the tally's fields by name."""
        return [
            {"day": day.isoformat(), "queue_id": queue_id, **tally._asdict()}
            for (day, queue_id), tally in sorted(self._tallies.items())
        ]

    def restore(self, rows: Iterable[Mapping[str, str | int]]) -> None:
        """Take the tallies of `rows` (see `rows`); a field a row lacks (written before the
        field was added) starts at zero."""
        self._tallies = {
            (date.fromisoformat(str(row["day"])), str(row["queue_id"])): Tally(
                **{name: int(row[name]) for name in Tally._fields if name in row}
            )
            for row in rows
        }
        self._today = None  # the days before the current one go at the next use
