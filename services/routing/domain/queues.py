"""Queues: where an interaction waits, who may answer it, and how the target widens.

Each queue serves one department in one language (and a direction).  Its
targets form a bullseye: the first asks for the department skill and the
language at a good proficiency; after configurable waits the proficiency drops
and finally the department skill is dropped, so no customer is stranded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from centralino.v1.routing_pb2 import Direction

from services.kernel.errors import InvalidField

STRATEGIES = ("longest_idle", "most_skilled", "least_occupied", "round_robin")
INBOUND_DEPARTMENTS = (
    "customer_service",
    "technical_support",
    "sales",
    "account_management",
    "escalation",
    "fraud",
    "social_media",
)
LANGUAGES = ("it", "pl", "en")


@dataclass(frozen=True)
class Target:
    after_s: float  # this ring applies once the interaction has waited this long
    skills: tuple[str, ...]  # every one required
    min_proficiency: int


@dataclass(frozen=True)
class QueueConfig:
    queue_id: str
    department: str
    language: str
    direction: int = Direction.INBOUND
    targets: tuple[Target, ...] = ()
    strategy: str = "longest_idle"
    sla_target: float = 0.8
    sla_threshold_s: float = 20.0
    offer_timeout_s: float = 15.0
    aging_per_minute: float = 1.0  # effective priority grows by this per minute waited
    pacing_limit: int = 0  # outbound: at most this many offered or connected at once (0 = none)
    short_abandon_s: float = 5.0
    target_agent_wait_s: float = 60.0  # a transfer to a named agent falls back to the queue after this
    decline_cooldown_s: float = 30.0  # an agent who rejected or missed it is not offered it again for this long
    extra: Mapping[str, Any] = field(default_factory=dict)

    def target_at(self, waited_s: float) -> tuple[int, Target]:
        """The widest ring reached after `waited_s` seconds, with its index."""
        step = max((i for i, t in enumerate(self.targets) if t.after_s <= waited_s), default=0)
        return step, self.targets[step]


def inbound_queue(department: str, language: str) -> QueueConfig:
    lang = f"lang:{language}"
    return QueueConfig(
        queue_id=f"{department}.{language}",
        department=department,
        language=language,
        targets=(
            Target(0, (department, lang), 3),
            Target(30, (department, lang), 1),
            Target(90, (lang,), 1),
        ),
    )


def outbound_queue(language: str) -> QueueConfig:
    return QueueConfig(
        queue_id=f"outbound.{language}",
        department="outbound",
        language=language,
        direction=Direction.OUTBOUND,
        targets=(Target(0, ("outbound", f"lang:{language}"), 1),),
        pacing_limit=5,
    )


def default_queues() -> dict[str, QueueConfig]:
    queues = [inbound_queue(d, lang) for d in INBOUND_DEPARTMENTS for lang in LANGUAGES]
    queues += [outbound_queue(lang) for lang in LANGUAGES]
    return {q.queue_id: q for q in queues}


def check_queue(queue: QueueConfig) -> None:
    if queue.strategy not in STRATEGIES:
        raise ValueError(f"queue {queue.queue_id}: strategy must be one of {', '.join(STRATEGIES)}")
    if not queue.targets or queue.targets[0].after_s != 0:
        raise ValueError(f"queue {queue.queue_id}: the first target must apply from 0 s")
    if list(queue.targets) != sorted(queue.targets, key=lambda t: t.after_s):
        raise ValueError(f"queue {queue.queue_id}: targets must widen in order of wait")


def load_queues(path: Path | None, base: Mapping[str, QueueConfig] | None = None) -> dict[str, QueueConfig]:
    """Default queues, overridden/extended by a JSON file: {"queue_id": {field: value, ...}}."""
    queues = dict(base or default_queues())
    if path is not None:
        for queue_id, fields in json.loads(path.read_text()).items():
            fields = dict(fields)
            if "targets" in fields:
                fields["targets"] = tuple(
                    Target(t["after_s"], tuple(t["skills"]), t["min_proficiency"]) for t in fields["targets"]
                )
            current = queues.get(queue_id) or QueueConfig(queue_id, fields["department"], fields["language"])
            queues[queue_id] = replace(current, **fields)
    for queue in queues.values():
        check_queue(queue)
    return queues


def queue_for(queues: Iterable[QueueConfig], department: str, language: str, direction: int) -> QueueConfig:
    """Inbound work goes by department and language; outbound campaign work by language."""
    candidates = [q for q in queues if q.direction == direction]
    if direction == Direction.OUTBOUND:
        for queue in candidates:
            if queue.language == language:
                return queue
        raise InvalidField("language", f"no outbound queue for language {language!r}")
    if not any(q.department == department for q in candidates):
        known = sorted({q.department for q in candidates})
        raise InvalidField("department", f"no queue for {department!r}; known: {', '.join(known)}")
    for queue in candidates:
        if queue.department == department and queue.language == language:
            return queue
    known = sorted({q.language for q in candidates if q.department == department})
    raise InvalidField("language", f"{department} is served in {', '.join(known)}, not {language!r}")
