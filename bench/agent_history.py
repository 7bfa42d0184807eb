"""What an agents service holds of each agent's history, and what a change costs, as its uptime grows.

Every change of an agent (a reservation on the offer's path among them) reads the agent.
The application keeps each agent folded and applies only the events after it, but until
session 8 the repository cached every event of every agent it had seen, and each read
copied that whole list: memory, the work per change and the garbage collector's full
walks grew with the hours the process had been up (about 400 agent events a second at
100 interactions/s).  Now the cache keeps each agent's newest `KEEP_EVENTS` and the
application asks for what follows the version it holds (`Repository.since`).

Side by side, in one run, for the history a process has seen after each uptime (50
agents, 100 interactions/s, four events per interaction): the old read (`history`, over
a cache holding everything) against the new (`since`, over a trimmed cache), both
folding the one new event a change brings:

* read + fold per change (median over rounds of every agent);
* memory the cache holds (tracemalloc);
* a full garbage collection with that cache alive (the pause every thread takes).

No database for these: the cache is filled as the process's own writes would fill it,
and what is timed runs in memory.

Then the router's agent feed, on views of an agent that has worked every day for 1, 30
and 92 days: a view kept as the read model keeps it (the last 92 days' counters) against
today and yesterday only (`FEED_DAYS_KEPT`, since session 8): fold per event, and the
bytes each agent adds to every feed checkpoint (all views go in one document, under
MongoDB's 16 MB).

Then the first read of an agent after a restart, on a FerretDB of its own: the whole
history (one `_id` lookup per event, as before session 8) against the latest snapshot
and the events after it (at most `SNAPSHOT_EVERY`), at rising history lengths.  And
the agents projection's bulk write of 50 agents' read models after 1, 30 and 92 days of
work: days and shifts as nested documents (until session 8) against JSON text.

Figures go to `bench/results/agent-history-<time>.json` and
`bench/results/agent-history-latest.md`.

    PYTHONPATH=.:gen python -m bench.agent_history
        (BENCH_AGENT_HISTORY_HOURS=0.25,1  BENCH_AGENT_RESTART_EVENTS=1050,10050)
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import bson
import faust.utils.json as faust_json
from centralino.v1 import agents_pb2 as pb
from faust.serializers import codecs
from pymongo import UpdateOne

from bench.routing import git_info
from infra.stack import FerretNode, free_ports
from services.agents import domain, state_view
from services.agents.adapters import (
    AgentDocument,
    AgentSnapshots,
    ViewWrite,
    save_agent_views,
    save_existing_agent_views,
)
from services.agents.application import SNAPSHOT_EVERY, AgentsApplication
from services.agents.events import AGENT, REGISTRY, TEAM
from services.kernel import eventstore, mongo
from services.kernel.config import Settings
from services.kernel.envelope import Metadata
from services.kernel.eventstore import EventStore
from services.kernel.repository import KEEP_EVENTS, History, Repository, _Cached
from services.routing.agent_feed import FEED_DAYS_KEPT

OUT = Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parent / "results"))
HOURS = tuple(float(h) for h in os.environ.get("BENCH_AGENT_HISTORY_HOURS", "0.25,1").split(","))
RESTART_EVENTS = tuple(int(n) for n in os.environ.get("BENCH_AGENT_RESTART_EVENTS", "1050,10050").split(","))
AFTER_SNAPSHOT = SNAPSHOT_EVERY // 2  # events written since the latest snapshot, on average
AGENTS = 50
FEED_DAYS = (1, 30, 92)
ZONE = ZoneInfo("Europe/Rome")
RATE = 100.0  # interactions a second
EVENTS_PER_INTERACTION = 4  # reserve, connect, end, complete wrap-up
T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
CYCLE = (pb.RESERVE, pb.CONNECT, pb.END, pb.COMPLETE_WRAP_UP)


def history_of(agent_id: str, events: int) -> History:
    """Registration, log-in, ready, then whole interactions, one event a second."""
    made: History = [
        (
            pb.AgentRegistered(
                agent_id=agent_id,
                name=agent_id,
                team_id="t1",
                channels=[pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=8)],
            ),
            T0,
        ),
        (pb.AgentStateChanged(agent_id=agent_id, transition=pb.LOG_IN), T0),
        (pb.AgentStateChanged(agent_id=agent_id, transition=pb.GO_READY), T0),
    ]
    for n in range(events - len(made)):
        change = pb.AgentStateChanged(
            agent_id=agent_id, transition=CYCLE[n % 4], interaction_id=f"{agent_id}-i{n // 4}", channel=pb.CHAT
        )
        made.append((change, T0 + timedelta(seconds=n)))
    return made


def repository(keep_events: int) -> Repository:
    return Repository(EventStore(), REGISTRY, "centralino.agents", AGENT, keep_events=keep_events)


def fill(repo: Repository, histories: dict[str, History]) -> None:
    """As a process's own writes leave it: read once, then extended write by write."""
    for agent_id, history in histories.items():
        with repo._lock:
            repo._remember(agent_id, _Cached(0, history))


def old_read(repo: Repository, agent: domain.Agent) -> domain.Agent:
    history = repo.history(agent.agent_id)  # a copy of everything cached
    for event, at in history[agent.version :]:
        agent = domain.apply(agent, event, at)
    return agent


def new_read(repo: Repository, agent: domain.Agent) -> domain.Agent:
    for event, at in repo.since(agent.agent_id, agent.version) or []:
        agent = domain.apply(agent, event, at)
    return agent


def measure(hours: float, keep_events: int, read: Any) -> dict[str, float]:
    per_agent = int(RATE * EVENTS_PER_INTERACTION * hours * 3600 / AGENTS)
    gc.collect()
    tracemalloc.start()
    histories = {f"agent-{n:03d}": history_of(f"agent-{n:03d}", per_agent) for n in range(AGENTS)}
    repo = repository(keep_events)
    fill(repo, histories)
    # Each agent folded up to its last event but one: a change brings one new event.
    folded = {a: domain.replay(a, h[:-1]) for a, h in histories.items()}
    del histories
    gc.collect()
    held_mb = tracemalloc.get_traced_memory()[0] / 1e6
    tracemalloc.stop()
    rounds = []
    for _ in range(20):
        started = time.perf_counter()
        for agent in folded.values():
            read(repo, agent)
        rounds.append((time.perf_counter() - started) / len(folded) * 1e6)
    pauses = []
    for _ in range(3):
        started = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - started) * 1e3)
    result = {
        "events_per_agent": per_agent,
        "read_fold_us": statistics.median(rounds),
        "memory_mb": held_mb,
        "full_gc_ms": min(pauses),
        "tracked_objects": len(gc.get_objects()),
    }
    del repo, folded
    gc.collect()
    return result


def worked_view(days: int) -> tuple[state_view.View, int]:
    """An agent's view after `days` working days (a break, three chats, eight hours), then logged in today."""
    view, sequence = state_view.new_view("a1"), 0

    def fold(event: pb.AgentRegistered | pb.AgentStateChanged, at: float) -> None:
        nonlocal view, sequence
        sequence += 1
        view = state_view.evolve(view, event, at, sequence, ZONE)

    today = T0.timestamp()
    channels = [pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=8)]
    fold(pb.AgentRegistered(agent_id="a1", name="Anna", team_id="t1", channels=channels), today - days * 86400)
    for day in range(days, 0, -1):
        at = today - day * 86400
        fold(pb.AgentStateChanged(agent_id="a1", transition=pb.LOG_IN), at)
        fold(pb.AgentStateChanged(agent_id="a1", transition=pb.GO_NOT_READY, reason=pb.BREAK), at + 100)
        fold(pb.AgentStateChanged(agent_id="a1", transition=pb.GO_READY), at + 200)
        for chat in range(3):
            for transition in CYCLE:
                change = pb.AgentStateChanged(
                    agent_id="a1", transition=transition, interaction_id=f"i{day}-{chat}", channel=pb.CHAT
                )
                fold(change, at + 300 + chat * 60)
        fold(pb.AgentStateChanged(agent_id="a1", transition=pb.LOG_OUT), at + 8 * 3600)
    fold(pb.AgentStateChanged(agent_id="a1", transition=pb.LOG_IN), today)
    fold(pb.AgentStateChanged(agent_id="a1", transition=pb.GO_READY), today + 1)
    return view, sequence


def feed_fold(days: int, days_kept: int) -> dict[str, float]:
    view, sequence = worked_view(days)
    view = state_view.evolve(
        view,
        pb.AgentStateChanged(agent_id="a1", transition=pb.GO_READY),
        T0.timestamp() + 2,
        sequence + 1,
        ZONE,
        days_kept,
    )
    changes = [pb.AgentStateChanged(agent_id="a1", transition=t, interaction_id="x", channel=pb.CHAT) for t in CYCLE]
    rounds = []
    for _ in range(5):
        folded, started = view, time.perf_counter()
        for n in range(400):
            at = T0.timestamp() + 10 + n
            folded = state_view.evolve(folded, changes[n % 4], at, sequence + 2 + n, ZONE, days_kept)
        rounds.append((time.perf_counter() - started) / 400 * 1e6)
    return {"fold_us": min(rounds), "checkpoint_bytes": len(bson.encode(folded))}


def changelog(days: int) -> dict[str, float]:
    """A view through Faust's JSON as the projection's table writes and reads it (its
    changelog): the standard library's encoder, Faust's without orjson (until session 8),
    against orjson."""
    view, _ = worked_view(days)
    codec = codecs.get_codec("json")

    def stdlib_dumps() -> bytes:
        return json.dumps(view, cls=faust_json.JSONEncoder, separators=(",", ":")).encode()

    def best_us(run: Callable[[], object]) -> float:
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(100):
                run()
            rounds.append((time.perf_counter() - started) / 100 * 1e6)
        return min(rounds)

    encoded = stdlib_dumps()
    return {
        "bytes": len(encoded),
        "stdlib_us": best_us(stdlib_dumps) + best_us(lambda: json.loads(encoded)),
        "orjson_us": best_us(lambda: codec.loads(codec.dumps(view))),
    }


def feed() -> list[dict[str, Any]]:
    rows = []
    for days in FEED_DAYS:
        whole, short = feed_fold(days, state_view.DAYS_KEPT), feed_fold(days, FEED_DAYS_KEPT)
        rows.append({"days": days, "read_model_days": whole, "feed_days": short, "changelog": changelog(days)})
        print(
            f"feed, {days} days worked: fold {whole['fold_us']:.1f} -> {short['fold_us']:.1f} us/event, "
            f"checkpoint {whole['checkpoint_bytes']} -> {short['checkpoint_bytes']} bytes/agent"
        )
    return rows


def application(snapshots: AgentSnapshots | None) -> AgentsApplication:
    store = EventStore()
    agents = Repository(store, REGISTRY, "centralino.agents", AGENT)
    teams = Repository(store, REGISTRY, "centralino.agents", TEAM)
    return AgentsApplication(agents, teams, snapshots=snapshots)


def first_read_s(snapshots: AgentSnapshots | None, agent_id: str) -> float:
    """A fresh process's first read of the agent (best of 3)."""
    times = []
    for _ in range(3):
        app = application(snapshots)
        started = time.perf_counter()
        app._agent(agent_id)
        times.append(time.perf_counter() - started)
    return min(times)


def write(writer: Repository, agent_id: str, events: History, version: int) -> None:
    meta = Metadata(correlation_id="bench", causation_id="bench", producer="bench")
    for start in range(0, len(events), 90):  # one commit each, under FerretDB's 100 documents
        chunk = events[start : start + 90]
        writer.save(agent_id, version + start, [e for e, _ in chunk], meta, [at for _, at in chunk])


@contextmanager
def ferretdb() -> Iterator[int]:
    """A FerretDB of the bench's own, connected; yields its pid."""
    with tempfile.TemporaryDirectory(prefix="centralino-agent-history-bench-") as tmp:
        node = FerretNode(Path(tmp) / "ferretdb", free_ports(1)[0])
        pid = node.start()
        try:
            mongo.connect(Settings(mongo_url=node.url, namespace="agenthistorybench"))
            eventstore.ensure_indexes()
            yield pid
        finally:
            mongo.disconnect()
            node.stop()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def restart() -> list[dict[str, Any]]:
    rows = []
    writer = Repository(EventStore(), REGISTRY, "centralino.agents", AGENT)
    for n, size in enumerate(RESTART_EVENTS):
        agent_id = f"agent-{n}"
        history = history_of(agent_id, size)
        snapshot_at = size - AFTER_SNAPSHOT  # as a running service leaves it: some events since
        write(writer, agent_id, history[:snapshot_at], 0)
        snapshots = AgentSnapshots()
        application(snapshots)._agent(agent_id)  # folded once: its snapshot is written
        assert snapshots.store.flush()
        write(writer, agent_id, history[snapshot_at:], snapshot_at)
        whole, snapshot = first_read_s(None, agent_id), first_read_s(AgentSnapshots(), agent_id)
        rows.append(
            {"events": size, "after_snapshot": AFTER_SNAPSHOT, "whole_history_s": whole, "from_snapshot_s": snapshot}
        )
        print(f"restart, {size} events: whole history {whole:.3f} s, from a snapshot {snapshot:.3f} s")
    return rows


def nested_write(write: ViewWrite) -> UpdateOne:
    """The projection's update as it was until session 8: days and shifts as nested documents."""
    fields = {**write.fields(), "days": write.view["days"], "shifts": write.view["shifts"]}
    return UpdateOne(
        {"_id": write.key, "version": {"$lt": write.sequences[0]}},
        {"$set": fields, "$inc": {"events_applied": len(write.sequences)}},
    )


def update_cost(pid: int, views: list[state_view.View], sequence: int, layout: str) -> dict[str, float]:
    AgentDocument.drop_collection()
    for agent in views:
        save_agent_views(ViewWrite(agent, [sequence], "e", "t"))
    collection = AgentDocument._get_collection()
    if layout == "nested":
        collection.bulk_write([nested_write(ViewWrite(v, [sequence + 1], "e", "t")) for v in views])
    rounds, started, cpu = 20, time.perf_counter(), cpu_s(pid)
    for r in range(rounds):
        writes = [ViewWrite({**v, "version": sequence + 2 + r}, [sequence + 2 + r], "e", "t") for v in views]
        if layout == "nested":
            collection.bulk_write([nested_write(w) for w in writes], ordered=True)
        else:
            save_existing_agent_views(writes)
    updates = rounds * len(views)
    return {
        "document_bytes": len(bson.encode(collection.find_one())),
        "update_ms": (time.perf_counter() - started) / updates * 1e3,
        "ferretdb_cpu_ms": (cpu_s(pid) - cpu) / updates * 1e3,
    }


def read_model(pid: int) -> list[dict[str, Any]]:
    """The projection's write of 50 agents' views (one bulk command, as a batch makes it),
    the views as they are after days of work: FerretDB v1 reads and rewrites the whole
    document, at a cost that grows with its number of values."""
    rows = []
    for days in FEED_DAYS:
        view, sequence = worked_view(days)
        views = [{**view, "agent_id": f"agent-{n:03d}"} for n in range(AGENTS)]
        nested, text = update_cost(pid, views, sequence, "nested"), update_cost(pid, views, sequence, "text")
        rows.append({"days": days, "nested": nested, "text": text})
        print(
            f"read model, {days} days worked: FerretDB CPU per update {nested['ferretdb_cpu_ms']:.2f} ms nested, "
            f"{text['ferretdb_cpu_ms']:.2f} ms as text"
        )
    return rows


def main() -> None:
    rows: list[dict[str, Any]] = []
    for hours in HOURS:
        old = measure(hours, 10**12, old_read)
        new = measure(hours, KEEP_EVENTS, new_read)
        rows.append({"hours": hours, "old": old, "new": new})
        print(
            f"{hours:g} h: read+fold {old['read_fold_us']:.1f} -> {new['read_fold_us']:.1f} us, "
            f"memory {old['memory_mb']:.0f} -> {new['memory_mb']:.1f} MB, "
            f"full gc {old['full_gc_ms']:.1f} -> {new['full_gc_ms']:.1f} ms",
            flush=True,
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    OUT.mkdir(parents=True, exist_ok=True)
    figures = {
        "run_at": stamp,
        **git_info(),
        "agents": AGENTS,
        "rate": RATE,
        "keep_events": KEEP_EVENTS,
        "snapshot_every": SNAPSHOT_EVERY,
        "rows": rows,
        "feed": feed(),
    }
    with ferretdb() as pid:
        figures |= {"restart": restart(), "read_model": read_model(pid)}
    (OUT / f"agent-history-{stamp}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (OUT / "agent-history-latest.md").write_text(report(figures))


def table(intro: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A section of the report: a sentence, then a Markdown table (numbers right-aligned)."""
    lines = ["", intro, "", "| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def pair(old: float, new: float, digits: int = 1) -> str:
    return f"{old:,.{digits}f} / {new:,.{digits}f}"


def memory_section(figures: dict[str, Any]) -> list[str]:
    rows = []
    for row in figures["rows"]:
        old, new = cast(dict[str, float], row["old"]), cast(dict[str, float], row["new"])
        rows.append(
            [
                f"{row['hours']:g} h",
                f"{old['events_per_agent']:,.0f}",
                pair(old["read_fold_us"], new["read_fold_us"]),
                f"{old['read_fold_us'] / new['read_fold_us']:.0f}x",
                pair(old["memory_mb"], new["memory_mb"]),
                pair(old["full_gc_ms"], new["full_gc_ms"]),
                f"{old['full_gc_ms'] / new['full_gc_ms']:.0f}x",
            ]
        )
    intro = (
        f"{figures['agents']} agents, {figures['rate']:g} interactions/s, the newest {figures['keep_events']} events "
        "kept per agent: the old read over everything cached against the new one over the newest events:"
    )
    header = ["uptime", "events per agent", "read + fold per change, old / new (us)", "ratio"]
    return table(intro, [*header, "cache memory, old / new (MB)", "full gc pause, old / new (ms)", "ratio"], rows)


def feed_section(figures: dict[str, Any]) -> list[str]:
    rows = []
    for row in figures["feed"]:
        whole, short = row["read_model_days"], row["feed_days"]
        rows.append(
            [
                str(row["days"]),
                pair(whole["fold_us"], short["fold_us"]),
                f"{whole['fold_us'] / short['fold_us']:.1f}x",
                pair(whole["checkpoint_bytes"], short["checkpoint_bytes"], 0),
                pair(16e6 / whole["checkpoint_bytes"], 16e6 / short["checkpoint_bytes"], 0),
            ]
        )
    intro = (
        "The router's agent feed: one agent's view after days of work, folded keeping the read model's "
        f"{state_view.DAYS_KEPT} days against today and yesterday (best of 5 rounds of 400 events); the bytes are "
        "what each agent adds to every feed checkpoint, one document under MongoDB's 16 MB:"
    )
    header = ["days worked", "fold per event, 92 days / 2 (us)", "ratio"]
    return table(intro, [*header, "checkpoint per agent, 92 days / 2 (bytes)", "agents under 16 MB, 92 days / 2"], rows)


def restart_section(figures: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"{row['events']:,}",
            str(row["after_snapshot"]),
            f"{row['whole_history_s']:.3f}",
            f"{row['from_snapshot_s']:.3f}",
            f"{row['whole_history_s'] / row['from_snapshot_s']:.0f}x",
        ]
        for row in figures["restart"]
    ]
    intro = (
        "An agent's first read after a restart, on FerretDB: the whole history against the latest snapshot "
        f"(one every {figures['snapshot_every']} events) and the events after it (best of 3):"
    )
    header = ["events in the agent's history", "after the snapshot", "whole history (s)", "from the snapshot (s)"]
    return table(intro, [*header, "ratio"], rows)


def changelog_section(figures: dict[str, Any]) -> list[str]:
    rows = []
    for row in figures["feed"]:
        log = row["changelog"]
        rows.append(
            [
                str(row["days"]),
                f"{log['bytes']:,.0f}",
                pair(log["stdlib_us"], log["orjson_us"]),
                f"{log['stdlib_us'] / log['orjson_us']:.1f}x",
            ]
        )
    intro = (
        "The agents projection's Faust table: one agent's view (the read model's 92 days) encoded and decoded "
        "by Faust's JSON, the standard library's (until session 8) against orjson (best of 5 rounds of 100); "
        "the table's changelog gets a record per agent per batch:"
    )
    return table(intro, ["days worked", "record (bytes)", "encode + decode, json / orjson (us)", "ratio"], rows)


def read_model_section(figures: dict[str, Any]) -> list[str]:
    rows = []
    for row in figures["read_model"]:
        nested, text = row["nested"], row["text"]
        rows.append(
            [
                str(row["days"]),
                pair(nested["document_bytes"], text["document_bytes"], 0),
                pair(nested["update_ms"], text["update_ms"], 2),
                pair(nested["ferretdb_cpu_ms"], text["ferretdb_cpu_ms"], 2),
                f"{nested['ferretdb_cpu_ms'] / text['ferretdb_cpu_ms']:.1f}x",
            ]
        )
    intro = (
        f"The agents projection's write of {figures['agents']} agents' read models in one bulk command, the views "
        "after days of work, each agent written 20 times: days and shifts as nested documents (until session 8) "
        "against one JSON text each (FerretDB v1 on SQLite reads and rewrites the whole document on every update; "
        "at 100 interactions/s the projection writes each agent about 4 times a second):"
    )
    header = ["days worked", "document, nested / text (bytes)", "per update, nested / text (ms)"]
    return table(intro, [*header, "FerretDB CPU per update, nested / text (ms)", "ratio"], rows)


def report(figures: dict[str, Any]) -> str:
    lines = [
        "# What grows with uptime in the agents service and the router's feed, old way against new",
        "",
        f"Run {figures['run_at']}, commit {figures['commit']}. "
        "Command: `PYTHONPATH=.:gen python -m bench.agent_history` (in `make bench`).",
    ]
    for section in (memory_section, feed_section, changelog_section, restart_section, read_model_section):
        lines += section(figures)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
