"""Routing benchmark: `make bench` (or `python -m bench.routing`).

Starts its own throw-away Kafka + FerretDB (infra.stack.ephemeral_stack), the agents
server and the routing server as subprocesses (the same environment the integration
tests give them), registers agents who are logged in and ready with chat capacity,
opens one StreamOffers per agent and lets bots answer every offer at once
(AcceptOffer, EndInteraction, CompleteInteraction), so capacity frees as fast as the
platform allows.  Then it drives CreateInteraction open loop, on a fixed schedule,
at rising rates, and measures per step:

* offer latency: CreateInteraction sent -> the offer arriving on the agent's stream,
  both taken on this process's monotonic clock (p50/p95/p99/max); also from the
  *scheduled* send time, which adds this client's own lag (no coordinated omission);
* achieved rates: creates answered, offers received, interactions completed per
  second over the step, against the target;
* whether the platform kept up: the backlog (created, not yet offered) at the end of
  the step and how long it took to drain;
* errors, CPU per process (the services, Kafka, FerretDB, this client) and, with the
  services run under `bench.instrument`, where the server time goes.

Results: `bench/results/routing-<UTC timestamp>.json` and `bench/results/latest.md`.

Steps run in rising order and the bench stops after the first step the platform did not
keep up with (offers below 95% of the target, a backlog at the end of the step, or a
backlog it could not drain in BENCH_DRAIN_S): higher rates would only pile up more.

Knobs (environment): BENCH_STEPS (rates, comma-separated; default 1,2,5,10,25,50,100,200,300,400),
BENCH_STEP_S (15), BENCH_AGENTS (12), BENCH_CHAT_CAPACITY (8), BENCH_DRAIN_S (20),
BENCH_WARMUP_S (3), BENCH_BUDGET_S (time budget of the load phase, 390),
BENCH_INSTRUMENT (1: timers in the services, 0: the plain entry points),
BENCH_SAMPLE_HZ (0: off; e.g. 100 samples every thread's stack in the services),
BENCH_SERVICE_ENV (extra K=V,K=V for the services), BENCH_KEEP (1: keep the temp dir
with the service logs), BENCH_OUT (results directory).  BENCH_SERVICE_ENV=MONGO_URL=mongodb://...
points the services at a real MongoDB instead of the stack's FerretDB, for comparison.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from centralino.v1 import agents_pb2 as apb
from centralino.v1 import agents_pb2_grpc, routing_pb2_grpc
from centralino.v1 import routing_pb2 as pb
from centralino.v1.agents_pb2 import Transition

from infra.stack import ephemeral_stack, free_port
from services.kernel.runner import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
QUEUE_ID = "customer_service.it"
GOAL_LATENCY_RATE = 100.0  # interactions/s at which p99 must be under GOAL_P99_MS
GOAL_P99_MS = 50.0
GOAL_THROUGHPUT = 300.0  # interactions/s sustained
TEAM_SIZE = 12  # a team leader's span of control is 10-16 agents
ROUTING_GRPC_WORKERS = 16  # services/kernel/grpc_server.py build_server(max_workers=16)
RPC_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Config:
    steps: tuple[float, ...] = (1, 2, 5, 10, 25, 50, 100, 200, 300, 400)
    step_s: float = 15.0
    # Each StreamOffers holds one of the routing server's 16 gRPC worker threads for as long as it is
    # open (services/kernel/grpc_server.py), so 16 agents online would starve every unary call.
    agents: int = 12
    chat_capacity: int = 8
    drain_s: float = 20.0
    warmup_s: float = 3.0
    budget_s: float = 390.0
    instrument: bool = True
    sample_hz: float = 0.0
    service_env: tuple[tuple[str, str], ...] = ()
    keep: bool = False
    out: str = str(ROOT / "bench" / "results")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        default = cls()
        extra = tuple(
            (key.strip(), value.strip())
            for key, _, value in (pair.partition("=") for pair in env.get("BENCH_SERVICE_ENV", "").split(","))
            if key.strip()
        )
        steps = env.get("BENCH_STEPS", "")
        return cls(
            steps=tuple(float(s) for s in steps.split(",") if s.strip()) if steps else default.steps,
            step_s=float(env.get("BENCH_STEP_S", default.step_s)),
            agents=int(env.get("BENCH_AGENTS", default.agents)),
            chat_capacity=int(env.get("BENCH_CHAT_CAPACITY", default.chat_capacity)),
            drain_s=float(env.get("BENCH_DRAIN_S", default.drain_s)),
            warmup_s=float(env.get("BENCH_WARMUP_S", default.warmup_s)),
            budget_s=float(env.get("BENCH_BUDGET_S", default.budget_s)),
            instrument=env.get("BENCH_INSTRUMENT", "1") not in ("0", "false", "no", ""),
            sample_hz=float(env.get("BENCH_SAMPLE_HZ", "0") or 0),
            service_env=extra,
            keep=env.get("BENCH_KEEP", "0") not in ("0", "false", "no", ""),
            out=env.get("BENCH_OUT", default.out),
        )


# --------------------------------------------------------------------------- #
# statistics helpers
# --------------------------------------------------------------------------- #


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of `values` (q in 0..100); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(q / 100.0 * len(ordered)), 1)
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def summary_ms(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": ms(percentile(values, 50)),
        "p95": ms(percentile(values, 95)),
        "p99": ms(percentile(values, 99)),
        "max": ms(max(values) if values else None),
        "mean": ms(sum(values) / len(values) if values else None),
    }


def ratio(numerator: float | None, denominator: float) -> float | None:
    return None if numerator is None or not denominator else round(numerator / denominator, 3)


# --------------------------------------------------------------------------- #
# processes: CPU accounting
# --------------------------------------------------------------------------- #

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class CpuMeter:
    """CPU seconds used by this process and every descendant, grouped by role."""

    def __init__(self, named: dict[int, str]) -> None:
        self.named = named  # pid -> label for the services we started

    def _label(self, pid: int) -> str:
        if pid == os.getpid():
            return "bench client"
        if pid in self.named:
            return self.named[pid]
        cmd = _cmdline(pid)
        if "kafka.Kafka" in cmd:
            return "kafka"
        if "ferretdb" in cmd:
            return "ferretdb"
        return "other"

    def snapshot(self) -> dict[str, float]:
        stats: dict[int, tuple[int, float]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
                stats[int(entry.name)] = stat
        ours = {os.getpid()}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _) in stats.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    grew = True
        totals: dict[str, float] = {}
        for pid in ours:
            if pid in stats:
                label = self._label(pid)
                totals[label] = totals.get(label, 0.0) + stats[pid][1]
        return totals


def cpu_percent(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Percent of one core per role over `wall_s` (200% is this whole 2-core machine)."""
    out = {
        label: round(100.0 * (after.get(label, 0.0) - before.get(label, 0.0)) / wall_s, 1)
        for label in sorted(set(before) | set(after))
    }
    out["total"] = round(sum(out.values()), 1)
    return out


# --------------------------------------------------------------------------- #
# the load
# --------------------------------------------------------------------------- #


@dataclass
class Item:
    iid: str
    step: int  # -1 = warm-up
    scheduled: float
    agent: str = ""
    sent: float | None = None
    created: float | None = None
    offered: float | None = None
    completed: float | None = None
    offers: int = 0  # an interaction offered twice (expired, refused) counts once for latency
    error: str = ""


@dataclass
class StepWindow:
    index: int
    rate: float
    start: float
    end: float
    drained_at: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    started_with_backlog: int = 0


class Load:
    def __init__(self, cfg: Config, routing_target: str, agent_ids: Sequence[str]) -> None:
        self.cfg = cfg
        self.target = routing_target
        self.agent_ids = list(agent_ids)
        self.items: dict[str, Item] = {}
        self.offer_times: list[float] = []
        self.complete_times: list[float] = []
        self.create_times: list[float] = []
        self.stream_errors: Counter[str] = Counter()
        self.unknown_offers = 0
        self.in_progress = 0
        self.peak_in_progress = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def _channel(self) -> grpc.aio.Channel:
        # A connection of its own (no shared subchannel), so creates, offers and bot
        # calls do not queue behind each other inside this client.
        return grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- agents' side ----

    async def _listen(self, stub: routing_pb2_grpc.RoutingServiceStub, agent_id: str, ready: asyncio.Event) -> None:
        call = stub.StreamOffers(pb.StreamOffersRequest(agent_id=agent_id))
        try:
            await call.initial_metadata()
            ready.set()
            async for offer in call:
                now = time.monotonic()
                self.offer_times.append(now)
                item = self.items.get(offer.interaction_id)
                if item is None:
                    self.unknown_offers += 1
                    item = Item(offer.interaction_id, -2, now)
                    self.items[item.iid] = item
                item.offers += 1
                if item.offered is None:
                    item.offered = now
                    item.agent = agent_id
                self.in_progress += 1
                self.peak_in_progress = max(self.peak_in_progress, self.in_progress)
                self._spawn(self._work(agent_id, item))
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.stream_errors[error.code().name] += 1

    async def _work(self, agent_id: str, item: Item) -> None:
        """A bot: accept at once, end, wrap up, so the capacity frees immediately."""
        decision = pb.OfferDecision(agent_id=agent_id, interaction_id=item.iid)
        step = "AcceptOffer"
        try:
            await self.bots.AcceptOffer(decision, timeout=RPC_TIMEOUT_S)
            step = "EndInteraction"
            await self.bots.EndInteraction(decision, timeout=RPC_TIMEOUT_S)
            step = "CompleteInteraction"
            request = pb.CompleteInteractionRequest(
                agent_id=agent_id, interaction_id=item.iid, wrap_up_code="ok", disposition="resolved"
            )
            await self.bots.CompleteInteraction(request, timeout=RPC_TIMEOUT_S)
            item.completed = time.monotonic()
            self.complete_times.append(item.completed)
        except grpc.aio.AioRpcError as error:
            item.error = item.error or f"{step}: {error.code().name}"
        finally:
            self.in_progress -= 1

    # ---- customers' side ----

    async def _create(self, item: Item) -> None:
        request = pb.CreateInteractionRequest(
            interaction_id=item.iid,
            channel=apb.CHAT,
            direction=pb.INBOUND,
            customer_id=f"{item.iid}@example.com",
            language="it",
            department="customer_service",
            priority=0,
        )
        item.sent = time.monotonic()
        try:
            await self.creates.CreateInteraction(request, timeout=RPC_TIMEOUT_S)
            item.created = time.monotonic()
            self.create_times.append(item.created)
        except grpc.aio.AioRpcError as error:
            item.error = f"CreateInteraction: {error.code().name}"

    async def _pace(self, step: int, rate: float, duration_s: float, start: float) -> None:
        """Open loop: the i-th interaction is due at start + i/rate whatever happened before."""
        for i in range(round(rate * duration_s)):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            item = Item(f"bench-{step}-{i}-{uuid.uuid4().hex[:8]}", step, due)
            self.items[item.iid] = item
            self._spawn(self._create(item))

    def _open(self, step: int) -> list[Item]:
        return [i for i in self.items.values() if i.step == step and i.completed is None and not i.error]

    def backlog(self) -> int:
        return sum(1 for i in self.items.values() if i.step >= -1 and i.offered is None and not i.error)

    async def _drain(self, step: int, limit_s: float) -> float | None:
        deadline = time.monotonic() + limit_s
        while self._open(step):
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return time.monotonic()

    # ---- the whole run ----

    async def run(self, meter: CpuMeter) -> list[StepWindow]:
        stream_channel, self._creates_channel, self._bots_channel = self._channel(), self._channel(), self._channel()
        self.creates = routing_pb2_grpc.RoutingServiceStub(self._creates_channel)
        self.bots = routing_pb2_grpc.RoutingServiceStub(self._bots_channel)
        streams = routing_pb2_grpc.RoutingServiceStub(stream_channel)
        readies = []
        listeners = []
        for agent_id in self.agent_ids:
            ready = asyncio.Event()
            readies.append(ready)
            listeners.append(asyncio.ensure_future(self._listen(streams, agent_id, ready)))
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), timeout=30)
        windows: list[StepWindow] = []
        began = time.monotonic()
        try:
            if self.cfg.warmup_s > 0:
                rate = min(20.0, self.cfg.steps[0])
                await self._pace(-1, rate, self.cfg.warmup_s, time.monotonic() + 0.05)
                await self._drain(-1, self.cfg.drain_s)
            for index, rate in enumerate(self.cfg.steps):
                elapsed = time.monotonic() - began
                if windows and elapsed + self.cfg.step_s + self.cfg.drain_s > self.cfg.budget_s:
                    print(f"  time budget reached; skipping {rate:g}/s and above", flush=True)
                    break
                start = time.monotonic() + 0.05
                window = StepWindow(index, rate, start, start + self.cfg.step_s, started_with_backlog=self.backlog())
                cpu_before = meter.snapshot()
                await self._pace(index, rate, self.cfg.step_s, start)
                await asyncio.sleep(max(window.end - time.monotonic(), 0.0))
                window.cpu = cpu_percent(cpu_before, meter.snapshot(), time.monotonic() - start)
                window.drained_at = await self._drain(index, self.cfg.drain_s)
                windows.append(window)
                verdict = step_metrics(self, window)
                print(
                    f"  {rate:>5g}/s: offers {verdict['offer_rate']:.1f}/s, p50 {verdict['latency_ms']['p50']} ms, "
                    f"p99 {verdict['latency_ms']['p99']} ms, backlog at end {verdict['backlog_at_end']}, "
                    f"kept up: {verdict['kept_up']}",
                    flush=True,
                )
                if not verdict["kept_up"]:
                    rest = [f"{r:g}" for r in self.cfg.steps[index + 1 :]]
                    if rest:
                        print(f"  saturated at {rate:g}/s; not running {', '.join(rest)}/s", flush=True)
                    break
        finally:
            for listener in listeners:
                listener.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for channel in (stream_channel, self._creates_channel, self._bots_channel):
                await channel.close()
        return windows


def _count_in(times: Iterable[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def step_metrics(load: Load, window: StepWindow) -> dict[str, Any]:
    duration = window.end - window.start
    items = [i for i in load.items.values() if i.step == window.index]
    offered = [i for i in items if i.offered is not None and i.sent is not None]
    latency = [i.offered - i.sent for i in offered]  # type: ignore[operator]
    from_schedule = [i.offered - i.scheduled for i in offered]  # type: ignore[operator]
    create_rpc = [i.created - i.sent for i in items if i.created is not None and i.sent is not None]
    pacing = [i.sent - i.scheduled for i in items if i.sent is not None]
    backlog = sum(1 for i in items if i.offered is None or i.offered >= window.end)
    never = sum(1 for i in items if i.offered is None)
    errors = Counter(i.error for i in items if i.error)
    offer_rate = _count_in(load.offer_times, window.start, window.end) / duration
    summary = summary_ms(latency)
    kept_up = (
        offer_rate >= 0.95 * window.rate
        and backlog <= max(3, 0.25 * window.rate)
        and never == 0
        and not errors
        and window.drained_at is not None
    )
    return {
        "target_rate": window.rate,
        "duration_s": round(duration, 2),
        "interactions": len(items),
        "send_rate": round(_count_in((i.sent for i in items if i.sent), window.start, window.end) / duration, 1),
        "create_rate": round(_count_in(load.create_times, window.start, window.end) / duration, 1),
        "offer_rate": round(offer_rate, 1),
        "completion_rate": round(_count_in(load.complete_times, window.start, window.end) / duration, 1),
        "achieved_over_target": ratio(offer_rate, window.rate),
        "latency_ms": summary,
        "latency_from_schedule_ms": summary_ms(from_schedule),
        "create_rpc_ms": summary_ms(create_rpc),
        "client_pacing_lag_ms": {"p99": ms(percentile(pacing, 99)), "max": ms(max(pacing) if pacing else None)},
        "p99_over_goal": ratio(summary["p99"], GOAL_P99_MS),
        "backlog_at_end": backlog,
        "never_offered": never,
        "reoffered": sum(1 for i in items if i.offers > 1),
        "started_with_backlog": window.started_with_backlog,
        "drain_s": round(window.drained_at - window.end, 2) if window.drained_at is not None else None,
        "errors": dict(errors),
        "kept_up": kept_up,
        "cpu_percent_of_one_core": window.cpu,
    }


# --------------------------------------------------------------------------- #
# server-side timings (bench.instrument)
# --------------------------------------------------------------------------- #


def load_timings(path: Path) -> dict[str, list[tuple[float, float, float]]]:
    if not path.exists():
        return {}
    with path.open("rb") as fh:
        data: dict[str, list[tuple[float, float, float]]] = pickle.load(fh)
    return data


def timing_summary(
    timings: dict[str, list[tuple[float, float, float]]], start: float, end: float
) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    wall = end - start
    for name, records in sorted(timings.items()):
        inside = [r for r in records if start <= r[0] < end]
        if not inside:
            continue
        durations = [r[1] for r in inside]
        extras = [r[2] for r in inside]
        out[name] = {
            "count": len(inside),
            "per_s": round(len(inside) / wall, 1),
            "mean_ms": ms(sum(durations) / len(durations)),
            "p50_ms": ms(percentile(durations, 50)),
            "p99_ms": ms(percentile(durations, 99)),
            "max_ms": ms(max(durations)),
            "busy_fraction": round(sum(durations) / wall, 3),  # >1: several threads at once
            "extra_mean": round(sum(extras) / len(extras), 2),
            "extra_max": max(extras),
        }
    return out


APPEND = "eventstore.append (insert_many)"
DB_CALLS: dict[str, list[tuple[str, str]]] = {
    "agent history loads (agents ChangeState)": [("agents", "eventstore.load (one aggregate's history)")],
    "outbox: find unpublished": [("routing", "outbox: find unpublished"), ("agents", "outbox: find unpublished")],
    "outbox: mark published": [("routing", "outbox: mark published"), ("agents", "outbox: mark published")],
    "event inserts": [("routing", APPEND), ("agents", APPEND)],
}


def docs_before(timings: dict[str, dict[str, list[tuple[float, float, float]]]], at: float) -> int:
    """About how many events the store holds at `at`: the appends so far (mostly one event each)."""
    return sum(1 for data in timings.values() for record in data.get(APPEND, ()) if record[0] < at)


def where_time_goes(per_service: dict[str, list[dict[str, dict[str, Any]]]], index: int) -> dict[str, Any]:
    """Database time by kind of call in one step, as seen by the services (seconds per second of wall
    time, including time queued in the database), and the router lock's occupancy."""

    def get(service: str, name: str) -> dict[str, Any]:
        steps = per_service.get(service) or []
        return steps[index].get(name, {}) if index < len(steps) else {}

    db = {
        kind: round(sum(get(svc, n).get("busy_fraction", 0.0) for svc, n in calls), 3)
        for kind, calls in DB_CALLS.items()
    }
    total = sum(db.values())
    return {
        "db_seconds_per_second": db,
        "db_share": {kind: ratio(value, total) for kind, value in db.items()},
        "router_lock_held_fraction": get("routing", "router lock hold").get("busy_fraction"),
        "router_lock_wait_mean_ms": get("routing", "router lock wait").get("mean_ms"),
        "agents_change_state_rpc_mean_ms": get("routing", "agents gRPC ChangeState (client side)").get("mean_ms"),
        "agent_history_load_mean_ms": get("agents", "eventstore.load (one aggregate's history)").get("mean_ms"),
        "outbox_find_unpublished_mean_ms": get("routing", "outbox: find unpublished").get("mean_ms"),
        "route_pass_mean_ms": get("routing", "router.route_once (pass)").get("mean_ms"),
    }


def sample_summary(path: Path, top: int = 25) -> dict[str, Any]:
    """Where each thread group spends its wall time: the innermost frames, by share of samples."""
    if not path.exists():
        return {}
    with path.open("rb") as fh:
        samples: dict[tuple[str, str], int] = pickle.load(fh)
    groups: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for (group, stack), count in samples.items():
        frames = stack.split(";")
        totals[group] += count
        groups.setdefault(group, Counter())[";".join(frames[-3:])] += count
        for frame in set(frames):
            inclusive.setdefault(group, Counter())[frame] += count
    return {
        group: {
            "samples": totals[group],
            "leaf": [(frames, round(n / totals[group], 3)) for frames, n in groups[group].most_common(top)],
            "inclusive": [(frame, round(n / totals[group], 3)) for frame, n in inclusive[group].most_common(top)],
        }
        for group in sorted(totals, key=lambda g: -totals[g])
    }


# --------------------------------------------------------------------------- #
# set-up of the platform
# --------------------------------------------------------------------------- #


def queues_file(directory: Path) -> Path:
    """The bench queue: Italian customer service, any agent with both skills, offers that never time out."""
    path = directory / "bench_queues.json"
    path.write_text(
        json.dumps(
            {
                QUEUE_ID: {
                    "offer_timeout_s": 600.0,
                    "targets": [{"after_s": 0, "skills": ["customer_service", "lang:it"], "min_proficiency": 1}],
                }
            },
            indent=2,
        )
    )
    return path


def register_agents(target: str, agents: int, chat_capacity: int) -> list[str]:
    ids = [f"bench-agent-{n:03d}" for n in range(agents)]
    with grpc.insecure_channel(target) as channel:
        stub = agents_pb2_grpc.AgentsServiceStub(channel)
        for team in range(math.ceil(agents / TEAM_SIZE)):
            stub.CreateTeam(apb.CreateTeamRequest(team_id=f"bench-team-{team}", name=f"Bench {team}"), timeout=10)
        for n, agent_id in enumerate(ids):
            stub.RegisterAgent(
                apb.RegisterAgentRequest(
                    agent_id=agent_id,
                    name=f"Bench agent {n}",
                    team_id=f"bench-team-{n // TEAM_SIZE}",
                    seniority=apb.CONSULTANT,
                    skills=[
                        apb.Skill(name="customer_service", proficiency=5),
                        apb.Skill(name="lang:it", proficiency=5),
                    ],
                    channels=[apb.ChannelCapacity(channel=apb.CHAT, max_concurrent=chat_capacity)],
                    override_span_of_control=True,
                ),
                timeout=10,
            )
            stub.ChangeState(apb.ChangeStateRequest(agent_id=agent_id, transition=Transition.LOG_IN), timeout=10)
            stub.ChangeState(apb.ChangeStateRequest(agent_id=agent_id, transition=Transition.GO_READY), timeout=10)
    return ids


def wait_agents_ready(target: str, expected: int, timeout_s: float = 60.0) -> None:
    """Until the router's own picture (its Kafka feed) shows every agent ready."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = routing_pb2_grpc.RoutingServiceStub(channel)
        while True:
            stats = stub.GetQueueStats(pb.GetQueueStatsRequest(queue_id=QUEUE_ID), timeout=10)
            if stats.agents_ready >= expected:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router sees {stats.agents_ready}/{expected} agents ready")
            time.sleep(0.2)


def event_store_size(mongo_url: str, database: str) -> int | None:
    try:
        import pymongo

        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        try:
            return int(client[database]["event_store"].count_documents({}))
        finally:
            client.close()
    except Exception:
        return None


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return result.stdout.rstrip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes_outside_bench": sorted(p for p in changed if not p.startswith("bench/")),
    }


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Routing benchmark",
        "",
        f"Run {result['started_utc']} on {result['machine']['cpus']} CPUs ({result['machine']['platform']}), "
        f"commit {result['git']['commit']}"
        + (" with uncommitted changes" if result["git"]["uncommitted_changes_outside_bench"] else "")
        + f"; took {result['wall_s']:.0f} s.  Command: `{result['command']}`.",
        "",
        f"{cfg['agents']} agents x {cfg['chat_capacity']} chats ({cfg['agents'] * cfg['chat_capacity']} slots), "
        f"bots accept/end/complete at once; open-loop steps of {cfg['step_s']:g} s"
        + (", services instrumented (bench.instrument)" if cfg["instrument"] else "")
        + ".  Latency = CreateInteraction sent -> offer on the agent's stream (ms).",
        "",
        "| target /s | n | sent /s | offers /s | completed /s | achieved / target | p50 | p95 | p99 | max "
        "| p99 / 50 ms | p99 from schedule | backlog at end | drain s | errors + never offered | kept up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| :---: |",
    ]
    for step in result["steps"]:
        lat = step["latency_ms"]
        errors = sum(step["errors"].values()) + step["never_offered"]
        lines.append(
            f"| {step['target_rate']:g} | {step['interactions']} | {_fmt(step['send_rate'])} "
            f"| {_fmt(step['offer_rate'])} | {_fmt(step['completion_rate'])} | {_fmt(step['achieved_over_target'], 2)} "
            f"| {_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['p99'])} | {_fmt(lat['max'])} "
            f"| {_fmt(step['p99_over_goal'], 2)} | {_fmt(step['latency_from_schedule_ms']['p99'])} "
            f"| {step['backlog_at_end']} | {_fmt(step['drain_s'], 2)} | {errors} | {_fmt(step['kept_up'])} |"
        )
    goals = result["goals"]
    lines += [
        "",
        f"- **Goal p99 < {GOAL_P99_MS:g} ms at {GOAL_LATENCY_RATE:g}/s:** {goals['latency']['verdict']}",
        f"- **Goal sustained >= {GOAL_THROUGHPUT:g}/s:** {goals['throughput']['verdict']}",
        "",
        "CPU, % of one core over each step (200% = the whole machine):",
        "",
    ]
    labels = sorted({label for step in result["steps"] for label in step["cpu_percent_of_one_core"]} - {"total"})
    labels.append("total")
    lines.append("| target /s | " + " | ".join(labels) + " |")
    lines.append("| ---: |" + " ---: |" * len(labels))
    for step in result["steps"]:
        cpu = step["cpu_percent_of_one_core"]
        lines.append(f"| {step['target_rate']:g} | " + " | ".join(_fmt(cpu.get(label)) for label in labels) + " |")
    if result["steps"] and "where_time_goes" in result["steps"][0]:
        lines += [
            "",
            "Where the time goes, per step.  Database time is seconds of calls per second of wall time as the "
            "services see them (time queued in FerretDB included, so the sum can pass 1):",
            "",
            "| | " + " | ".join(f"{s['target_rate']:g}/s" for s in result["steps"]) + " |",
            "| --- |" + " ---: |" * len(result["steps"]),
        ]
        rows: list[tuple[str, Any]] = [
            ("event store documents at step end (approx.)", lambda s: s["event_store_docs_approx"]["end"]),
        ]
        for kind in DB_CALLS:
            rows.append(
                (
                    f"DB: {kind}, s/s (share)",
                    lambda s, k=kind: (
                        f"{s['where_time_goes']['db_seconds_per_second'][k]:.2f} "
                        f"({_fmt(s['where_time_goes']['db_share'][k], 2)})"
                    ),
                )
            )
        rows += [
            ("agent history load, mean ms", lambda s: _fmt(s["where_time_goes"]["agent_history_load_mean_ms"])),
            (
                "outbox find unpublished, mean ms",
                lambda s: _fmt(s["where_time_goes"]["outbox_find_unpublished_mean_ms"]),
            ),
            (
                "agents ChangeState RPC from routing, mean ms",
                lambda s: _fmt(s["where_time_goes"]["agents_change_state_rpc_mean_ms"]),
            ),
            (
                "router lock held, fraction of time",
                lambda s: _fmt(s["where_time_goes"]["router_lock_held_fraction"], 2),
            ),
            ("router lock wait, mean ms", lambda s: _fmt(s["where_time_goes"]["router_lock_wait_mean_ms"])),
        ]
        for label, cell in rows:
            lines.append(f"| {label} | " + " | ".join(str(cell(s)) for s in result["steps"]) + " |")
    for service in ("routing", "agents"):
        per_step = result.get("server_timings", {}).get(service)
        if not per_step:
            continue
        lines += ["", f"Server-side timings in the {service} service (ms; per step: calls/s, mean, p99):", ""]
        names = sorted({name for timings in per_step for name in timings})
        lines.append("| call | " + " | ".join(f"{s['target_rate']:g}/s" for s in result["steps"]) + " |")
        lines.append("| --- |" + " --- |" * len(result["steps"]))
        for name in names:
            cells = []
            for timings in per_step:
                t = timings.get(name)
                cells.append(f"{t['per_s']:g}/s, {_fmt(t['mean_ms'])}, {_fmt(t['p99_ms'])}" if t else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Raw figures: `{result['json_file']}`.", ""]
    return "\n".join(lines)


def goals(steps: list[dict[str, Any]]) -> dict[str, Any]:
    at_goal = next((s for s in steps if s["target_rate"] == GOAL_LATENCY_RATE), None)
    saturated = next((s for s in steps if not s["kept_up"]), None)
    if at_goal is None:
        why = f"no {GOAL_LATENCY_RATE:g}/s step"
        if saturated is not None and saturated["target_rate"] < GOAL_LATENCY_RATE:
            why = (
                f"not reached: the platform saturated at {saturated['target_rate']:g}/s "
                f"({saturated['offer_rate']:g} offers/s); "
                f"at {GOAL_LATENCY_RATE:g}/s the queue would grow without bound"
            )
        best = [s for s in steps if s["kept_up"]]
        if best:
            low = best[-1]
            why += f"; p99 at {low['target_rate']:g}/s (highest step kept up) was {_fmt(low['latency_ms']['p99'])} ms"
        latency: dict[str, Any] = {"p99_ms": None, "met": False, "verdict": why + " - NOT met"}
    else:
        p99 = at_goal["latency_ms"]["p99"]
        met = bool(at_goal["kept_up"] and p99 is not None and p99 < GOAL_P99_MS)
        latency = {
            "p99_ms": p99,
            "p99_over_goal": at_goal["p99_over_goal"],
            "kept_up": at_goal["kept_up"],
            "met": met,
            "verdict": f"p99 {_fmt(p99)} ms = {_fmt(at_goal['p99_over_goal'], 2)}x the goal"
            + ("" if at_goal["kept_up"] else f", and the platform did not keep up ({at_goal['offer_rate']}/s offered)")
            + (" - met" if met else " - NOT met"),
        }
    kept = [s for s in steps if s["kept_up"]]
    sustained = max((s["offer_rate"] for s in kept), default=0.0)
    sustained_target = max((s["target_rate"] for s in kept), default=0.0)
    peak = max((s["offer_rate"] for s in steps), default=0.0)
    met_t = sustained >= GOAL_THROUGHPUT
    throughput = {
        "sustained_rate": sustained,
        "highest_step_kept_up": sustained_target,
        "peak_offer_rate": peak,
        "sustained_over_goal": ratio(sustained, GOAL_THROUGHPUT),
        "met": met_t,
        "verdict": f"highest step kept up {sustained_target:g}/s ({sustained:g} offers/s = "
        f"{_fmt(ratio(sustained, GOAL_THROUGHPUT), 2)}x the goal); peak offer rate in any step {peak:g}/s"
        + (" - met" if met_t else " - NOT met"),
    }
    return {"latency": latency, "throughput": throughput}


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def service(module: str, env: dict[str, str], log: Path, timings: Path, cfg: Config) -> ServiceProcess:
    if not cfg.instrument:
        return ServiceProcess(module, env, log)
    extra = {"BENCH_TARGET_MODULE": module, "BENCH_TIMINGS_OUT": str(timings)}
    if cfg.sample_hz > 0:
        extra |= {"BENCH_SAMPLE_HZ": str(cfg.sample_hz), "BENCH_SAMPLES_OUT": str(timings.with_suffix(".samples"))}
    return ServiceProcess("bench.instrument", {**env, **extra}, log)


def run(cfg: Config) -> dict[str, Any]:
    began_wall = time.monotonic()
    started = datetime.now(UTC)
    if cfg.agents >= ROUTING_GRPC_WORKERS:
        print(
            f"warning: {cfg.agents} offer streams hold {cfg.agents} of the routing server's "
            f"{ROUTING_GRPC_WORKERS} gRPC worker threads for good; unary calls may starve",
            flush=True,
        )
    tmp = Path(tempfile.mkdtemp(prefix="centralino-bench-"))
    print(f"bench: work dir {tmp}", flush=True)
    try:
        with ephemeral_stack(tmp / "stack") as endpoints:
            state = tmp / "state"
            state.mkdir()
            namespace = f"bench{uuid.uuid4().hex[:8]}"
            agents_port, routing_port = free_port(), free_port()
            env = {
                "KAFKA_BOOTSTRAP": endpoints["kafka_bootstrap"],
                "MONGO_URL": endpoints["mongo_url"],
                "CENTRALINO_NAMESPACE": namespace,
                "CENTRALINO_STATE_DIR": str(state),
                "CENTRALINO_RELAY_INTERVAL_S": "0.2",
                "AGENTS_GRPC_PORT": str(agents_port),
                "ROUTING_GRPC_PORT": str(routing_port),
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
                "CENTRALINO_ROUTING_QUEUES": str(queues_file(tmp)),
                **dict(cfg.service_env),
            }
            agents_target, routing_target = f"127.0.0.1:{agents_port}", f"127.0.0.1:{routing_port}"
            agents_server = service("services.agents.server", env, state / "agents.log", tmp / "agents.timings", cfg)
            routing_server = service(
                "services.routing.server", env, state / "routing.log", tmp / "routing.timings", cfg
            )
            agents_server.start()
            routing_server.start()
            try:
                agents_server.wait_healthy(agents_target, timeout_s=60)
                routing_server.wait_healthy(routing_target, timeout_s=60)
                print(f"bench: stack and services up after {time.monotonic() - began_wall:.0f} s", flush=True)
                agent_ids = register_agents(agents_target, cfg.agents, cfg.chat_capacity)
                wait_agents_ready(routing_target, len(agent_ids))
                print(f"bench: {len(agent_ids)} agents ready; load steps {list(cfg.steps)}/s", flush=True)
                meter = CpuMeter({agents_server.pid: "agents server", routing_server.pid: "routing server"})
                load = Load(cfg, routing_target, agent_ids)
                windows = asyncio.run(load.run(meter))
                routing_server.check_alive()
                stored_events = event_store_size(endpoints["mongo_url"], namespace)
            finally:
                routing_server.stop()
                agents_server.stop()
        steps = [step_metrics(load, window) for window in windows]
        timings = {name: load_timings(tmp / f"{name}.timings") for name in ("routing", "agents")}
        server_timings = {
            name: [timing_summary(data, w.start, w.end) for w in windows] for name, data in timings.items() if data
        }
        if server_timings:
            for index, (step, window) in enumerate(zip(steps, windows, strict=True)):
                step["event_store_docs_approx"] = {
                    "start": docs_before(timings, window.start),
                    "end": docs_before(timings, window.end),
                }
                step["where_time_goes"] = where_time_goes(server_timings, index)
        samples = {name: sample_summary(tmp / f"{name}.samples") for name in ("routing", "agents")}
        result: dict[str, Any] = {
            "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "make bench",
            "wall_s": round(time.monotonic() - began_wall, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "git": git_info(),
            "config": asdict(cfg),
            "goals": goals(steps),
            "steps": steps,
            "client": {
                "peak_in_progress": load.peak_in_progress,
                "slots": cfg.agents * cfg.chat_capacity,
                "unknown_offers": load.unknown_offers,
                "stream_errors": dict(load.stream_errors),
                "interactions_total": sum(1 for i in load.items.values() if i.step >= -1),
            },
            "event_store_documents_at_end": stored_events,
            "server_timings": server_timings,
            "server_samples": {k: v for k, v in samples.items() if v},
        }
        return result
    finally:
        if cfg.keep:
            print(f"bench: kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def write(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["started_utc"].replace("-", "").replace(":", "")
    json_path = out_dir / f"routing-{stamp}.json"
    try:
        result["json_file"] = str(json_path.relative_to(ROOT))
    except ValueError:
        result["json_file"] = str(json_path)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path = out_dir / "latest.md"
    md_path.write_text(render_markdown(result))
    return json_path, md_path


def main() -> int:
    cfg = Config.from_env()
    result = run(cfg)
    json_path, md_path = write(result, Path(cfg.out))
    print()
    print(md_path.read_text())
    print(f"bench: wrote {json_path} and {md_path} in {result['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
