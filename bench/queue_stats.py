"""Queue figures: walking every interaction the router has seen against running tallies, side by side.

Until session 5 the router kept every interaction it had ever seen, and each
GetQueueStats (and every tick of every WatchQueues stream, for every queue) walked all
of them with `stats.queue_kpis`, which is kept as the definition the tallies are
tested against and is what "walk all" times here.  Now closed interactions leave
memory after a retention and the figures are per-queue tallies, updated when an
interaction changes.  In one run, on the same
interactions (lifecycles as the routing bench drives them, a tenth abandoned), this
measures:

* one queue's figures: `queue_kpis` over all interactions (the old way) against
  `DayTallies.today` + `kpis` over the open interactions (the new way), at rising history;
* what the new way adds to each interaction's life (`DayTallies.count` on its changes);
* memory per interaction kept (tracemalloc), hence what a router holds after a day at
  100 interactions/s: every interaction (old) against the retention's worth (new).

Figures go to `bench/results/queue-stats-<time>.json` and `bench/results/queue-stats-latest.md`.

    PYTHONPATH=.:gen python -m bench.queue_stats   (BENCH_QUEUE_STATS_SIZES=1000,10000,100000)
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from centralino.v1.agents_pb2 import CHAT

from bench.routing import git_info
from services.kernel.config import Settings
from services.routing.domain import interaction as domain
from services.routing.domain.interaction import OPEN, CreateInteraction, Interaction
from services.routing.domain.queues import default_queues
from services.routing.domain.stats import DayTallies, QueueKpis, is_waiting, kpis, queue_kpis

OUT = Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parent / "results"))
SIZES = tuple(int(s) for s in os.environ.get("BENCH_QUEUE_STATS_SIZES", "1000,10000,100000").split(","))
QUEUES = default_queues()
QUEUE = QUEUES["customer_service.it"]
OPEN_NOW = 200  # interactions in play at any moment (waiting, offered, connected)
VARIANT = "answered_and_abandoned"
RATE = 100.0  # interactions a second, for the day's memory
RETENTION_S = Settings().routing_closed_retention_s
T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC).timestamp()
ZONE = ZoneInfo("Europe/Rome")


def life(n: int, until: datetime) -> list[Interaction]:
    """One interaction's states, as the router holds them one after another."""
    at = T0 + n * 0.01
    command = CreateInteraction(f"i{n}", CHAT, 1, "+39 333 000", "it", "customer_service")
    steps: list[Callable[[Interaction], list[Any]]] = [lambda i: domain.create(command, i, QUEUE)]
    if n % 10 == 9:
        steps.append(lambda i: domain.abandon(i, "hung up"))
    else:
        steps += [
            lambda i: domain.offer(i, "anna", until, 0),
            lambda i: domain.accept(i, "anna"),
            lambda i: domain.end(i, "anna"),
            lambda i: domain.complete(i, "anna", "billing", "resolved"),
        ]
    states, current = [], Interaction(interaction_id=command.interaction_id)
    for k, step in enumerate(steps):
        for event in step(current):
            current = domain.apply(current, event, at + k * (3 + n % 40))
        states.append(current)
    return states


def best_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return round(min(times) * 1000, 4)


def measure(size: int) -> dict[str, Any]:
    until = datetime.fromtimestamp(T0 + 10**6, UTC)
    lives = [life(n, until) for n in range(size)]
    finals = {states[-1].interaction_id: states[-1] for states in lives}
    # The ones still in play: the last OPEN_NOW, each caught half-way through its life.
    for states in lives[-OPEN_NOW:]:
        finals[states[0].interaction_id] = states[len(states) // 2]
    now = T0 + size * 0.01 + 60
    tallies = DayTallies(QUEUES, ZONE)
    began = time.perf_counter()
    for states in lives:
        before: Interaction | None = None
        for state in states:
            tallies.count(before, state, now)
            before = state
    count_s = time.perf_counter() - began
    tallies = DayTallies(QUEUES, ZONE)
    for interaction in finals.values():
        tallies.count(None, interaction, now)
    open_now = {iid: i for iid, i in finals.items() if i.status in OPEN}

    def walk() -> QueueKpis:
        return queue_kpis(list(finals.values()), QUEUE, now, VARIANT)

    def tally() -> QueueKpis:
        _, figures = tallies.today(QUEUE.queue_id, now)
        return kpis(QUEUE, figures, [i for i in open_now.values() if is_waiting(i, QUEUE.queue_id)], now, VARIANT)

    old, new = walk(), tally()
    same = dataclasses.replace(new, average_speed_of_answer_s=old.average_speed_of_answer_s)
    assert same == old and abs(new.average_speed_of_answer_s - old.average_speed_of_answer_s) < 1e-6, (old, new)
    repeat = max(3, min(50, 200_000 // size))
    walk_ms, tally_ms = best_ms(walk, repeat), best_ms(tally, repeat * 5)
    return {
        "interactions": size,
        "open": len(open_now),
        "walk_all_ms": walk_ms,
        "tallies_ms": tally_ms,
        "walk_over_tallies": round(walk_ms / tally_ms, 1),
        "count_us_per_interaction": round(count_s / size * 1e6, 2),
    }


def bytes_per_interaction(size: int = 20_000) -> float:
    until = datetime.fromtimestamp(T0 + 10**6, UTC)
    tracemalloc.start()
    kept = {}
    for n in range(size):
        final = life(n, until)[-1]
        kept[final.interaction_id] = final
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return used / size


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Queue figures: walking every interaction against running tallies",
        "",
        f"Run {result['started_utc']}, commit {result['git']['commit']}.  Command: `{result['command']}`.  "
        f"Queue `{QUEUE.queue_id}`, {OPEN_NOW} interactions in play, service level `{VARIANT}`; best of repeats.",
        "",
        "| interactions seen | walk all (old), ms | tallies (new), ms | old / new | count, us per interaction |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["sizes"]:
        lines.append(
            f"| {row['interactions']:,} | {row['walk_all_ms']} | {row['tallies_ms']} | "
            f"{row['walk_over_tallies']}x | {row['count_us_per_interaction']} |"
        )
    memory = result["memory"]
    lines += [
        "",
        f"Memory per interaction kept: {memory['bytes_per_interaction']:,.0f} bytes.  After a day at "
        f"{RATE:g}/s the old router held {memory['day_old_mb']:,.0f} MB of interactions; with a "
        f"{RETENTION_S:g} s retention the new one holds {memory['retention_new_mb']:,.0f} MB "
        f"({memory['old_over_new']:.0f}x less), whatever the uptime.",
        "",
        "Each queue's figures were computed for every GetQueueStats and, for every queue, on every tick "
        "of every WatchQueues stream: the old walk's time is multiplied by queues x watchers x ticks.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    started = datetime.now(UTC)
    sizes = [measure(size) for size in SIZES]
    per = bytes_per_interaction()
    day_old = per * RATE * 86_400 / 1e6
    retained = per * RATE * RETENTION_S / 1e6
    result: dict[str, Any] = {
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": git_info(),
        "command": "make bench (python -m bench.queue_stats)",
        "sizes": sizes,
        "memory": {
            "bytes_per_interaction": round(per),
            "day_old_mb": round(day_old),
            "retention_new_mb": round(retained),
            "old_over_new": round(day_old / retained, 1),
        },
    }
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = result["started_utc"].replace("-", "").replace(":", "")
    (OUT / f"queue-stats-{stamp}.json").write_text(json.dumps(result, indent=2))
    (OUT / "queue-stats-latest.md").write_text(render(result))
    print(render(result))
    print(f"median walk/tally ratio: {statistics.median(r['walk_over_tallies'] for r in sizes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
