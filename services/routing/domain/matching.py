"""Who gets what: ordering waiting interactions and choosing agents.  Pure.

Ordering: effective priority (priority plus aging per minute waited) first, then
the time the interaction entered its queue, so one whose offer ended keeps its
place at the front.  Matching: the interaction's queue target for how long it
has waited (bullseye widening), then the queue's strategy among qualified agents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from services.routing.domain.interaction import Interaction
from services.routing.domain.queues import QueueConfig, Target


@dataclass(frozen=True)
class Candidate:
    agent_id: str
    skills: Mapping[str, int]
    channels: frozenset[int]  # channels with room for one more interaction now
    idle_since: float  # when the agent last became free (longest idle first)
    occupancy: float = 0.0  # today's, 0..1
    last_offer_at: float = 0.0  # round robin


@dataclass(frozen=True)
class Match:
    interaction_id: str
    agent_id: str
    step: int  # index of the queue target that matched


def effective_priority(interaction: Interaction, queue: QueueConfig, now: float) -> float:
    waited = now - (interaction.enqueued_at or now)
    return interaction.priority + queue.aging_per_minute * waited / 60.0


def qualifies(candidate: Candidate, target: Target, channel: int) -> bool:
    return channel in candidate.channels and all(
        candidate.skills.get(skill, 0) >= target.min_proficiency for skill in target.skills
    )


def _skill_sum(candidate: Candidate, target: Target) -> int:
    return sum(candidate.skills.get(skill, 0) for skill in target.skills)


STRATEGY_KEYS: dict[str, Callable[[Candidate, Target], tuple]] = {
    "longest_idle": lambda c, t: (c.idle_since, c.agent_id),
    "most_skilled": lambda c, t: (-_skill_sum(c, t), c.idle_since, c.agent_id),
    "least_occupied": lambda c, t: (c.occupancy, c.idle_since, c.agent_id),
    "round_robin": lambda c, t: (c.last_offer_at, c.agent_id),
}


def choose(strategy: str, candidates: Iterable[Candidate], target: Target) -> Candidate | None:
    key = STRATEGY_KEYS[strategy]
    return min(candidates, key=lambda c: key(c, target), default=None)


def in_order(waiting: Iterable[Interaction], queues: Mapping[str, QueueConfig], now: float) -> list[Interaction]:
    return sorted(
        waiting,
        key=lambda i: (-effective_priority(i, queues[i.queue_id], now), i.enqueued_at or now, i.interaction_id),
    )


def plan(
    waiting: Iterable[Interaction],
    queues: Mapping[str, QueueConfig],
    candidates: Mapping[str, Candidate],
    now: float,
    after_offer: Callable[[Candidate, int], Candidate | None],
    in_progress: Mapping[str, int] | None = None,
) -> list[Match]:
    """Offers to make now.  `after_offer` gives an agent's remaining room after one more
    interaction on a channel (None: no room left); `in_progress` counts offered or
    connected interactions per queue, for outbound pacing."""
    pool = dict(candidates)
    busy = dict(in_progress or {})
    matches: list[Match] = []
    for interaction in in_order(waiting, queues, now):
        if not pool:
            break  # every agent is full: the rest wait (a long queue costs nothing more)
        queue = queues[interaction.queue_id]
        if queue.pacing_limit and busy.get(queue.queue_id, 0) >= queue.pacing_limit:
            continue
        step, target = queue.target_at(now - (interaction.enqueued_at or now))
        if interaction.target_agent and now - (interaction.queued_since or now) < queue.target_agent_wait_s:
            named = pool.get(interaction.target_agent)  # a transfer to a named agent: only they, for a while
            qualified = [named] if named and interaction.channel in named.channels else []
        else:
            recent = {a for a, at in interaction.declined if now - at < queue.decline_cooldown_s}
            qualified = [
                c for c in pool.values() if c.agent_id not in recent and qualifies(c, target, interaction.channel)
            ]
        chosen = choose(queue.strategy, qualified, target)
        if chosen is None:
            continue
        matches.append(Match(interaction.interaction_id, chosen.agent_id, step))
        busy[queue.queue_id] = busy.get(queue.queue_id, 0) + 1
        remaining = after_offer(chosen, interaction.channel)
        if remaining is None:
            del pool[chosen.agent_id]
        else:
            pool[chosen.agent_id] = remaining
    return matches
