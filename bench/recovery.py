"""Router start-up: from a checkpoint against folding the whole routing log, side by side.

Before session 7 a restarted router folded every event of the routing log (on FerretDB
a scan and sort of the whole event store); now it begins from its last checkpoint.
This bench grows one routing log in a FerretDB of its own, through the router itself
(200 interactions left waiting, then more created and abandoned or cancelled), and at
each size takes a checkpoint, writes a tail after it (what the seconds until the next
checkpoint would add), then starts two new routers on that log: one from the checkpoint
and one folding the whole log (the checkpoint set aside).  Both must come to the same
open interactions and queue figures; their start-up times are the figures.

The log holds routing events only: a real event store also holds the agents' events,
which the whole-log fold scans too, so the fold's figures here are its best case.

Figures go to `bench/results/recovery-<time>.json` and `bench/results/recovery-latest.md`.

    PYTHONPATH=.:gen python -m bench.recovery   (BENCH_RECOVERY_SIZES=2000,10000,50000,
                                                 BENCH_RECOVERY_TAIL=500)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
from centralino.v1 import routing_pb2 as pb
from centralino.v1.agents_pb2 import CHAT

from bench.routing import git_info
from infra.stack import FerretNode, free_ports
from services.kernel import eventstore, mongo
from services.kernel.config import Settings
from services.kernel.envelope import Metadata
from services.kernel.repository import Repository
from services.routing.agent_feed import AgentFeed
from services.routing.agents_port import AgentsPort
from services.routing.checkpoints import drop_checkpoint, load_checkpoint, save_checkpoint
from services.routing.domain.interaction import CreateInteraction
from services.routing.domain.queues import default_queues
from services.routing.events import INTERACTION, REGISTRY
from services.routing.offers import OfferBus
from services.routing.router import Router

OUT = Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parent / "results"))
SIZES = tuple(int(s) for s in os.environ.get("BENCH_RECOVERY_SIZES", "2000,10000,50000").split(","))
TAIL = int(os.environ.get("BENCH_RECOVERY_TAIL", "500"))  # 5 s at 100/s: half a checkpoint interval
OPEN = 200  # interactions waiting throughout, as a busy contact center always has some
ZONE = ZoneInfo("UTC")
META = Metadata(correlation_id="bench", causation_id="bench", producer="bench")
QUEUES = default_queues()
DEPARTMENTS = ("customer_service", "technical_support", "sales", "account_management")


class Log:
    """One routing log and the routers made on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic("routing")
        self.channel = grpc.insecure_channel("127.0.0.1:9")  # the agents service: never called

    def router(self) -> Router:
        store = eventstore.EventStore(log_name=self.topic)  # a new process's store
        return Router(
            Repository(store, REGISTRY, self.topic, INTERACTION),
            AgentsPort(self.channel),
            AgentFeed(self.settings.kafka_bootstrap, self.settings.topic("agents"), ZONE, lambda _: None),
            OfferBus(),
            QUEUES,
            lambda: datetime.now(UTC),
            "answered_and_abandoned",
            self.topic,
            ZONE,
            self.settings.routing_closed_retention_s,
        )


def grow(router: Router, first: int, count: int, close: bool = True) -> None:
    """`count` more interactions, each abandoned (four in five) or cancelled, unless `close` is False."""

    def one(n: int) -> None:
        iid = f"i-{n:07d}"
        department = DEPARTMENTS[n % len(DEPARTMENTS)]
        router.create(CreateInteraction(iid, CHAT, pb.INBOUND, f"c-{n}@example.com", "it", department), "")
        if not close:
            return
        if n % 5 == 4:
            router.cancel(iid, "duplicate", META)
        else:
            router.abandon(iid, "hung up", META)

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(one, range(first, first + count)))


def state(router: Router) -> tuple[int, list[tuple[str, int, int, int]]]:
    figures = []
    for queue_id in router.queue_ids():
        _, kpis, _, _, _ = router.queue_stats(queue_id)
        figures.append((queue_id, kpis.offered, kpis.abandoned, kpis.waiting))
    return len(router._open), figures


def events_in(topic: str) -> int:
    return int(eventstore.collection(eventstore.EVENTS_COLLECTION).count_documents({"topic": topic}))


def timed_recovery(log: Log) -> tuple[float, tuple[int, list[tuple[str, int, int, int]]]]:
    router = log.router()
    started = time.perf_counter()
    router.recover()
    return time.perf_counter() - started, state(router)


def run() -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="centralino-recovery-bench-") as tmp:
        node = FerretNode(Path(tmp) / "ferretdb", free_ports(1)[0])
        node.start()
        try:
            settings = Settings(mongo_url=node.url, namespace="recoverybench")
            mongo.connect(settings)
            eventstore.ensure_indexes()
            log = Log(settings)
            writer = log.router()
            grow(writer, 0, OPEN, close=False)  # the work in play, whatever the history
            written = OPEN
            for size in SIZES:
                grow(writer, written, size - written)
                assert writer.checkpoint()
                grow(writer, size, TAIL)
                written = size + TAIL
                checkpoint = load_checkpoint(log.topic)
                assert checkpoint is not None
                from_checkpoint_s, from_checkpoint = timed_recovery(log)
                drop_checkpoint(log.topic)
                whole_log_s, whole_log = timed_recovery(log)
                save_checkpoint(log.topic, checkpoint)  # back, for the next size
                assert from_checkpoint == whole_log, "the two start-ups disagree"
                row = {
                    "interactions": written,
                    "events": events_in(log.topic),
                    "open": from_checkpoint[0],
                    "read_back_at_checkpoint": len(checkpoint.read_back),
                    "tail_interactions": TAIL,
                    "whole_log_s": whole_log_s,
                    "from_checkpoint_s": from_checkpoint_s,
                }
                rows.append(row)
                print(
                    f"recovery: {written} interactions ({row['events']} events): whole log {whole_log_s:.2f} s, "
                    f"from the checkpoint {from_checkpoint_s:.2f} s"
                )
        finally:
            mongo.disconnect()
            node.stop()
    return rows


def report(rows: list[dict[str, Any]], git: dict[str, Any]) -> str:
    lines = [
        "# Router start-up: from a checkpoint against the whole routing log",
        "",
        f"Commit {git.get('commit', '?')}; one FerretDB (SQLite) of its own; the log grown through the router "
        f"({OPEN} interactions waiting, the others closed), a checkpoint at each size, "
        f"then {TAIL} interactions after it.  "
        "Both start-ups reach the same open interactions and queue figures.  Command: `make bench` "
        "(or `python -m bench.recovery`).",
        "",
        "| interactions | events | open | whole log s | from checkpoint s | whole / checkpoint |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = r["whole_log_s"] / r["from_checkpoint_s"] if r["from_checkpoint_s"] else float("nan")
        lines.append(
            f"| {r['interactions']} | {r['events']} | {r['open']} | {r['whole_log_s']:.2f} "
            f"| {r['from_checkpoint_s']:.2f} | {ratio:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = run()
    git = git_info()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"recovery-{stamp}.json").write_text(json.dumps({"git": git, "tail": TAIL, "rows": rows}, indent=2))
    text = report(rows, git)
    (OUT / "recovery-latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
