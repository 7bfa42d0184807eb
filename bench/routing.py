"""Routing benchmark: `make bench` (or `python -m bench.routing`).

Starts its own throw-away Kafka + FerretDB (infra.stack.ephemeral_stack), the agents
server and the routing server as subprocesses (the same environment the integration
tests give them), registers agents who are logged in and ready with chat capacity,
opens one StreamOffers per agent and lets bots answer every offer at once
(AcceptOffer, EndInteraction, CompleteInteraction), so capacity frees as fast as the
platform allows.  Then it drives CreateInteraction open loop, on a fixed schedule,
at rising rates, and measures per step:

* offer latency: CreateInteraction sent -> the offer arriving on the agent's stream,
  both on CLOCK_MONOTONIC (time.monotonic(), one clock for every process of the
  machine) (p50/p95/p99/max); also from the *scheduled* send time, which adds this
  client's own lag (no coordinated omission);
* achieved rates: creates answered, offers received, interactions completed per
  second over the step, against the target;
* whether the platform kept up: the backlog (created, not yet offered) at the end of
  the step and how long it took to drain;
* errors, CPU per process (the services, Kafka, FerretDB, this client) and, with the
  services run under `bench.instrument`, where the server time goes;
* the client itself: its CPU per interaction, its event loops' lag and how many of the
  agents' chat slots were ever in use, so a figure limited by the client or by too few
  agents shows as such.

The client: the gRPC work runs in BENCH_CLIENT_WORKERS processes (`bench.loadgen`, one
grpc.aio event loop each): every worker sends its share of the creates and holds the
streams (and runs the bots) of its share of the agents.  This process only coordinates
(registers agents, starts steps) and folds the workers' reports.

Agents: enough that their chat slots are never the limit.  Before a step at R/s the
bench has max(BENCH_AGENTS, ceil(R x S / BENCH_CHAT_CAPACITY)) agents logged in and
ready: their slots cover S seconds of handling (offer -> completed) per interaction,
S = BENCH_SLOT_S or 3x the previous step's p99 handling time if that is longer (a
platform near saturation answers the bots slowly too, and its slots fill).  The
report shows the most slots ever in use at once, so a step limited by them shows.
Agents join teams of 12 (span of control 10-16, no override needed); more agents are
registered between steps as the rate rises.

Results: `bench/results/routing-<UTC timestamp>.json` and `bench/results/latest.md`.

Steps run in rising order and the bench stops after the first step the platform did not
keep up with (offers below 95% of the target, a backlog at the end of the step, or a
backlog it could not drain in BENCH_DRAIN_S): higher rates would only pile up more.

Knobs (environment):
  BENCH_STEPS             rates, comma-separated (10,25,50,100,200,300)
  BENCH_STEP_S            seconds per step (15)
  BENCH_AGENTS            at least this many agents (12)
  BENCH_CHAT_CAPACITY     chats per agent (8, the most the agents service allows)
  BENCH_SLOT_S            seconds of handling the slots cover at each rate (4)
  BENCH_DRAIN_S           how long a step may take to drain (20)
  BENCH_WARMUP_S          warm-up load before the first step (at least 30 s at up to 20/s,
                          in rounds of 10 s): the fresh Kafka broker spends its first
                          minutes JIT-compiling (C2), about a quarter of a core that a
                          running deployment does not pay, so the warm-up goes on until
                          the broker's compiler threads used under BENCH_JIT_SETTLED_PCT
                          (5) % of a core over a round, or BENCH_WARMUP_MAX_S (300) passed
  BENCH_BUDGET_S          time budget of the load phase (150)
  BENCH_CLIENT_WORKERS    load generator processes (1: one loop holds 300/s at about a
                          third of a core)
  BENCH_CLIENT_GRPC_EXPERIMENTS  GRPC_EXPERIMENTS of the workers (-event_engine_client:
                          gRPC's older client I/O path, ~15-20% less CPU per call here;
                          empty for gRPC's defaults)
  BENCH_CLIENT_NICE       the workers' scheduling priority (-5, so on a busy machine the
                          client reads its clocks on time; 0 leaves it; needs root)
  BENCH_PLATFORM          real; `fake` drives `bench.fake_routing`, a routing server that
                          does nothing, to measure the client alone (to latest-fake.md)
  BENCH_INSTRUMENT        1: timers in the services (bench.instrument), 0: plain entry points
  BENCH_SAMPLE_HZ         0: off; e.g. 100 samples every thread's stack in the services
  BENCH_SERVICE_ENV       extra K=V,K=V for the services; MONGO_URL=mongodb://... points
                          them at a real MongoDB instead of the stack's FerretDB
  BENCH_YARDSTICK         1: after the steps, the gRPC exchange alone (this client against
                          `bench.fake_routing`) at 100/s for 15 s, in the same run: the
                          platform's CPU per interaction is reported as a ratio to it, a
                          figure that does not move with the machine's speed; 0: skip it
  BENCH_KEEP              1: keep the temp dir with the service logs
  BENCH_OUT               results directory (bench/results)
"""

from __future__ import annotations

import json
import math
import os
import pickle
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import grpc
from centralino.v1 import agents_pb2 as apb
from centralino.v1 import agents_pb2_grpc, routing_pb2_grpc
from centralino.v1 import routing_pb2 as pb
from centralino.v1.agents_pb2 import Transition

from bench.loadgen import interaction_id
from infra.stack import ephemeral_stack, free_port
from services.kernel.runner import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
QUEUE_ID = "customer_service.it"
GOAL_LATENCY_RATE = 100.0  # interactions/s at which p99 must be under GOAL_P99_MS
GOAL_P99_MS = 50.0
GOAL_THROUGHPUT = 300.0  # interactions/s sustained
TEAM_SIZE = 12  # a team leader's span of control is 10-16 agents
ROUTING_GRPC_WORKERS = 512  # CENTRALINO_GRPC_MAX_WORKERS: one thread per open stream, plus the unary calls
SLOTS_FULL = 0.95  # a step that had this share of its slots in use at once may have been limited by them


# --------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------- #


def _flag(value: str) -> bool:
    return value not in ("0", "false", "no", "")


@dataclass(frozen=True)
class Config:
    steps: tuple[float, ...] = (10, 25, 50, 100, 200, 300)
    step_s: float = 15.0
    agents: int = 12  # at least; more as the rate needs (slot_s)
    chat_capacity: int = 8
    slot_s: float = 4.0
    drain_s: float = 20.0
    warmup_s: float = 30.0
    warmup_max_s: float = 300.0
    jit_settled_pct: float = 5.0
    budget_s: float = 150.0
    workers: int = 1
    client_grpc_experiments: str = "-event_engine_client"
    client_nice: int = -5
    platform: str = "real"
    instrument: bool = True
    sample_hz: float = 0.0
    service_env: tuple[tuple[str, str], ...] = ()
    yardstick: bool = True
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
        cfg = cls(
            steps=tuple(float(s) for s in steps.split(",") if s.strip()) if steps else default.steps,
            step_s=float(env.get("BENCH_STEP_S", default.step_s)),
            agents=int(env.get("BENCH_AGENTS", default.agents)),
            chat_capacity=int(env.get("BENCH_CHAT_CAPACITY", default.chat_capacity)),
            slot_s=float(env.get("BENCH_SLOT_S", default.slot_s)),
            drain_s=float(env.get("BENCH_DRAIN_S", default.drain_s)),
            warmup_s=float(env.get("BENCH_WARMUP_S", default.warmup_s)),
            warmup_max_s=float(env.get("BENCH_WARMUP_MAX_S", default.warmup_max_s)),
            jit_settled_pct=float(env.get("BENCH_JIT_SETTLED_PCT", default.jit_settled_pct)),
            budget_s=float(env.get("BENCH_BUDGET_S", default.budget_s)),
            workers=max(int(env.get("BENCH_CLIENT_WORKERS", default.workers)), 1),
            client_grpc_experiments=env.get("BENCH_CLIENT_GRPC_EXPERIMENTS", default.client_grpc_experiments),
            client_nice=int(env.get("BENCH_CLIENT_NICE", default.client_nice) or 0),
            platform=env.get("BENCH_PLATFORM", default.platform) or default.platform,
            instrument=_flag(env.get("BENCH_INSTRUMENT", "1")),
            sample_hz=float(env.get("BENCH_SAMPLE_HZ", "0") or 0),
            service_env=extra,
            yardstick=_flag(env.get("BENCH_YARDSTICK", "1")),
            keep=_flag(env.get("BENCH_KEEP", "0")),
            out=env.get("BENCH_OUT", default.out),
        )
        if cfg.platform not in ("real", "fake"):
            raise SystemExit(f"BENCH_PLATFORM must be real or fake, not {cfg.platform!r}")
        if any(rate <= 0 for rate in cfg.steps):
            raise SystemExit("BENCH_STEPS must be positive rates")
        return cfg

    def agents_for(self, rate: float, handling_s: float = 0.0) -> int:
        """Agents whose chat slots cover `slot_s` seconds of handling per interaction at `rate`/s,
        or three times `handling_s` (the last step's p99 from offer to completed) if that is longer."""
        return max(self.agents, math.ceil(rate * max(self.slot_s, 3 * handling_s) / self.chat_capacity))


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
CLIENT = "bench client"
TRACE_SINK = "trace sink (collector)"


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of a live process."""
    return _read_stat(Path(f"/proc/{pid}/stat"))


def _read_stat(path: Path) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) from a process's or a thread's stat file."""
    try:
        raw = path.read_text()
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
    """CPU seconds used by this process and every descendant, grouped by role.

    The descendants are looked up (every process's stat) on the first snapshot and on
    `refresh`; the other snapshots read only theirs, so measuring costs the client little."""

    def __init__(self, named: dict[int, str]) -> None:
        self.named = named  # pid -> label for the processes we started
        self._tree: dict[int, str] = {}

    def _label(self, pid: int) -> str:
        if pid == os.getpid():
            return CLIENT
        if pid in self.named:
            return self.named[pid]
        cmd = _cmdline(pid)
        if "kafka.Kafka" in cmd:
            return "kafka"
        if "ferretdb" in cmd:
            return "ferretdb"
        return "other"

    def refresh(self) -> None:
        stats: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
                stats[int(entry.name)] = stat[0]
        ours = {os.getpid()}
        grew = True
        while grew:
            grew = False
            for pid, ppid in stats.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    grew = True
        self._tree = {pid: self._label(pid) for pid in ours}

    def pids_of(self, label: str) -> list[int]:
        if not self._tree:
            self.refresh()
        return [pid for pid, named in self._tree.items() if named == label]

    def snapshot(self, refresh: bool = False) -> dict[str, float]:
        if refresh or not self._tree:
            self.refresh()
        totals: dict[str, float] = {}
        for pid, label in self._tree.items():
            if (stat := _proc_stat(pid)) is not None:
                totals[label] = totals.get(label, 0.0) + stat[1]
        return totals


JIT_THREADS = ("C1 CompilerThre", "C2 CompilerThre")  # HotSpot's compiler threads, as the kernel names them


def jit_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds the JIT compiler threads of these JVMs have used."""
    total = 0.0
    for pid in pids:
        with suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with suppress(OSError):
                    if (task / "comm").read_text().startswith(JIT_THREADS) and (stat := _read_stat(task / "stat")):
                        total += stat[1]
    return total


def cpu_percent(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Percent of one core per role over `wall_s` (200% is this whole 2-core machine)."""
    out = {
        label: round(100.0 * (after.get(label, 0.0) - before.get(label, 0.0)) / wall_s, 1)
        for label in sorted(set(before) | set(after))
    }
    out["total"] = round(sum(out.values()), 1)
    return out


# --------------------------------------------------------------------------- #
# the load: worker processes (bench.loadgen) and what they report
# --------------------------------------------------------------------------- #


@dataclass
class Item:
    iid: str
    step: int  # -1 = warm-up, -2 = an offer for an interaction this run never created
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
    agents: int = 0
    drained_at: float | None = None
    settled_at: float = 0.0  # drained, or given up on
    cpu: dict[str, float] = field(default_factory=dict)
    client_cpu_s: float = 0.0  # the client's CPU from the step's start until it settled
    started_with_backlog: int = 0


def _label(index: int) -> str:
    return "w" if index < 0 else f"s{index}"


class Client:
    """The load generators and the folded picture of every interaction they touched."""

    def __init__(self, cfg: Config, routing_target: str) -> None:
        self.cfg = cfg
        self.target = routing_target
        self.tag = uuid.uuid4().hex[:8]
        self.items: dict[str, Item] = {}
        self.offer_times: list[float] = []
        self.complete_times: list[float] = []
        self.create_times: list[float] = []
        self.lags: list[tuple[float, float]] = []  # (when, how late) from every worker's loop
        self.stream_errors: Counter[str] = Counter()
        self.unknown_offers = 0
        self.duplicate_offers = 0
        self.agents: list[str] = []
        self.open: Counter[int] = Counter()  # per step: interactions neither completed nor failed
        self.lock = threading.Lock()
        self._ready: Counter[int] = Counter()
        self.nice: dict[int, tuple[int, bool]] = {}  # worker -> (nice value, whether BENCH_CLIENT_NICE took)
        self._changed = threading.Condition(self.lock)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []
        self._byes = 0
        self._closed = 0
        self._reader: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # ---- processes ----

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
        if self.cfg.client_grpc_experiments:
            env["GRPC_EXPERIMENTS"] = self.cfg.client_grpc_experiments
        env["BENCH_CLIENT_NICE"] = str(self.cfg.client_nice)
        for index in range(self.cfg.workers):
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.loadgen",
                    str(theirs.fileno()),
                    self.target,
                    str(index),
                    str(self.cfg.workers),
                ],
                env=env,
                pass_fds=(theirs.fileno(),),
                cwd=ROOT,
            )
            theirs.close()
            self._procs.append(proc)
            self._conns.append(Connection(ours.detach()))
        self._reader = threading.Thread(target=self._read, name="bench-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        for conn in self._conns:
            with suppress(OSError):
                conn.send(("stop",))
        with self.lock:
            self._changed.wait_for(lambda: max(self._byes, self._closed) >= len(self._conns), timeout=15)
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()

    def check_alive(self) -> None:
        for proc in self._procs:
            if proc.poll() is not None and self._byes < len(self._procs):
                raise RuntimeError(f"a bench.loadgen worker exited with {proc.returncode}")

    def _read(self) -> None:
        live = list(self._conns)
        while live:
            for conn in wait(live):
                assert isinstance(conn, Connection)
                try:
                    batch = conn.recv()
                except (EOFError, OSError):
                    live.remove(conn)
                    with self.lock:
                        self._closed += 1
                        self._changed.notify_all()
                    continue
                with self.lock:
                    self._apply(batch)
                    self._changed.notify_all()

    def _apply(self, batch: list[tuple[Any, ...]]) -> None:
        items = self.items
        for event in batch:
            kind = event[0]
            if kind == "lag":
                self.lags.append((event[1], event[2]))
            elif kind == "sent":
                if (item := items.get(event[1])) is not None:
                    item.sent = event[2]
            elif kind == "created":
                self.create_times.append(event[2])
                if (item := items.get(event[1])) is not None:
                    item.created = event[2]
            elif kind == "offer":
                _, iid, agent, now = event
                self.offer_times.append(now)
                item = items.get(iid)
                if item is None:
                    self.unknown_offers += 1
                    item = items[iid] = Item(iid, -2, now)
                item.offers += 1
                if item.offered is None:
                    item.offered = now
                    item.agent = agent
            elif kind == "done":
                self.complete_times.append(event[2])
                if (item := items.get(event[1])) is not None:
                    if item.completed is None and not item.error:
                        self.open[item.step] -= 1
                    item.completed = event[2]
            elif kind == "error":
                if (item := items.get(event[1])) is not None and not item.error:
                    if item.completed is None:
                        self.open[item.step] -= 1
                    item.error = event[2]
            elif kind == "dup":
                self.duplicate_offers += 1
            elif kind == "stream_error":
                self.stream_errors[event[2]] += 1
            elif kind == "nice":
                self.nice[event[1]] = (event[2], event[3])
            elif kind == "ready":
                self._ready[event[1]] += 1
            elif kind == "bye":
                self._byes += 1

    # ---- agents ----

    def add_agents(self, agent_ids: Sequence[str]) -> None:
        """Open the new agents' offer streams, spread over the workers; wait until all are open."""
        new = [a for a in agent_ids if a not in self.agents]
        if not new:
            return
        shares: list[list[str]] = [[] for _ in self._conns]
        for n, agent_id in enumerate(new, start=len(self.agents)):
            shares[n % len(self._conns)].append(agent_id)
        with self.lock:
            expected = Counter({i: self._ready[i] + (1 if share else 0) for i, share in enumerate(shares)})
        for conn, share in zip(self._conns, shares, strict=True):
            if share:
                conn.send(("agents", share))
        with self.lock:
            if not self._changed.wait_for(lambda: all(self._ready[i] >= n for i, n in expected.items()), timeout=90):
                raise TimeoutError("the load generators could not open every agent's offer stream")
        self.agents.extend(new)

    # ---- customers ----

    def send_step(self, index: int, rate: float, duration_s: float, start: float, label: str = "") -> None:
        """Schedule a step's interactions (i due at start + i/rate) across the workers;
        `label` tells apart the ids of several rounds of one step (the warm-up's)."""
        label = label or _label(index)
        with self.lock:
            for i in range(round(rate * duration_s)):
                iid = interaction_id(self.tag, label, i)
                self.items[iid] = Item(iid, index, start + i / rate)
            self.open[index] += round(rate * duration_s)
        for conn in self._conns:
            conn.send(("step", label, rate, start, duration_s, self.tag))

    def open_count(self, step: int) -> int:
        with self.lock:
            return self.open[step]

    def backlog(self) -> int:
        with self.lock:
            return sum(1 for i in self.items.values() if i.step >= -1 and i.offered is None and not i.error)

    def drain(self, step: int, limit_s: float) -> float | None:
        """When every interaction of `step` is completed or failed; None past `limit_s`."""
        deadline = time.monotonic() + limit_s
        while self.open_count(step):
            self.check_alive()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return time.monotonic()


def _count_in(times: Iterable[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def peak_in_progress(items: Iterable[Item], until: float) -> int:
    """Most interactions offered and not yet completed at once (each holds a chat slot)."""
    changes: list[tuple[float, int]] = []
    for item in items:
        if item.offered is not None:
            changes.append((item.offered, 1))
            changes.append((item.completed if item.completed is not None else until, -1))
    peak = current = 0
    for _, delta in sorted(changes):
        current += delta
        peak = max(peak, current)
    return peak


def step_metrics(client: Client, window: StepWindow) -> dict[str, Any]:
    with client.lock:
        items = [i for i in client.items.values() if i.step == window.index]
        offer_times, complete_times = list(client.offer_times), list(client.complete_times)
        create_times = list(client.create_times)
        lags = [lag for t, lag in client.lags if window.start <= t < window.end]
    duration = window.end - window.start
    offered = [i for i in items if i.offered is not None and i.sent is not None]
    latency = [i.offered - i.sent for i in offered]  # type: ignore[operator]
    from_schedule = [i.offered - i.scheduled for i in offered]  # type: ignore[operator]
    create_rpc = [i.created - i.sent for i in items if i.created is not None and i.sent is not None]
    handling = [i.completed - i.offered for i in items if i.completed is not None and i.offered is not None]
    pacing = [i.sent - i.scheduled for i in items if i.sent is not None]
    backlog = sum(1 for i in items if i.offered is None or i.offered >= window.end)
    never = sum(1 for i in items if i.offered is None)
    errors = Counter(i.error for i in items if i.error)
    offer_rate = _count_in(offer_times, window.start, window.end) / duration
    summary = summary_ms(latency)
    kept_up = (
        offer_rate >= 0.95 * window.rate
        and backlog <= max(3, 0.25 * window.rate)
        and never == 0
        and not errors
        and window.drained_at is not None
    )
    slots = window.agents * client.cfg.chat_capacity
    peak = peak_in_progress(items, window.settled_at or window.end)
    return {
        "target_rate": window.rate,
        "duration_s": round(duration, 2),
        "interactions": len(items),
        "send_rate": round(_count_in((i.sent for i in items if i.sent), window.start, window.end) / duration, 1),
        "create_rate": round(_count_in(create_times, window.start, window.end) / duration, 1),
        "offer_rate": round(offer_rate, 1),
        "completion_rate": round(_count_in(complete_times, window.start, window.end) / duration, 1),
        "achieved_over_target": ratio(offer_rate, window.rate),
        "latency_ms": summary,
        "latency_from_schedule_ms": summary_ms(from_schedule),
        "create_rpc_ms": summary_ms(create_rpc),
        "handling_ms": summary_ms(handling),  # offer -> completed: how long an interaction holds a slot
        "client_pacing_lag_ms": {"p99": ms(percentile(pacing, 99)), "max": ms(max(pacing) if pacing else None)},
        "client_loop_lag_ms": {"p99": ms(percentile(lags, 99)), "max": ms(max(lags) if lags else None)},
        # Only for a step whose every interaction was done with: a step left undrained has had part of its work.
        "client_cpu_ms_per_interaction": (
            round(1000.0 * window.client_cpu_s / len(items), 3) if items and window.drained_at is not None else None
        ),
        "p99_over_goal": ratio(summary["p99"], GOAL_P99_MS),
        "backlog_at_end": backlog,
        "never_offered": never,
        "reoffered": sum(1 for i in items if i.offers > 1),
        "started_with_backlog": window.started_with_backlog,
        "drain_s": round(window.drained_at - window.end, 2) if window.drained_at is not None else None,
        "errors": dict(errors),
        "kept_up": kept_up,
        "agents": window.agents,
        "slots": slots,
        "peak_in_progress": peak,
        "slots_peak_used": ratio(peak, slots),
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
COMMIT = "eventstore group commit (intent + inserts)"  # bench.instrument.COMMIT; extra = events written
DB_CALLS: dict[str, list[tuple[str, str]]] = {
    "agent history loads (agents ChangeState)": [("agents", "eventstore.load (one aggregate's history)")],
    "outbox: find unpublished": [("routing", "outbox: find unpublished"), ("agents", "outbox: find unpublished")],
    "outbox: mark published": [("routing", "outbox: mark published"), ("agents", "outbox: mark published")],
    # With a group commit, append only waits for it: the commit is the database time.
    "event inserts": [("routing", COMMIT), ("agents", COMMIT), ("routing", APPEND), ("agents", APPEND)],
}


def docs_before(timings: dict[str, dict[str, list[tuple[float, float, float]]]], at: float) -> int:
    """About how many events the store holds at `at`: the events group commits wrote so far, or
    (without a group commit) the appends so far, mostly one event each."""
    total = 0
    for data in timings.values():
        if data.get(COMMIT):
            total += int(sum(record[2] for record in data[COMMIT] if record[0] < at))
        else:
            total += sum(1 for record in data.get(APPEND, ()) if record[0] < at)
    return total


def where_time_goes(per_service: dict[str, list[dict[str, dict[str, Any]]]], index: int) -> dict[str, Any]:
    """Database time by kind of call in one step, as seen by the services (seconds per second of wall
    time, including time queued in the database), and the router lock's occupancy."""

    def get(service: str, name: str) -> dict[str, Any]:
        steps = per_service.get(service) or []
        return steps[index].get(name, {}) if index < len(steps) else {}

    def busy(service: str, name: str) -> float:
        if name == APPEND and get(service, COMMIT):
            return 0.0  # counted as the group commit's time
        return float(get(service, name).get("busy_fraction", 0.0))

    db = {kind: round(sum(busy(svc, n) for svc, n in calls), 3) for kind, calls in DB_CALLS.items()}
    total = sum(db.values())
    return {
        "db_seconds_per_second": db,
        "db_share": {kind: ratio(value, total) for kind, value in db.items()},
        "router_lock_held_fraction": get("routing", "router lock hold").get("busy_fraction"),
        "router_lock_wait_mean_ms": get("routing", "router lock wait").get("mean_ms"),
        "agents_change_state_rpc_mean_ms": get("routing", "agents gRPC ChangeState (client side)").get("mean_ms")
        or get("routing", "agents gRPC ChangeStates batch (client side)").get("mean_ms"),
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


def agent_id(n: int) -> str:
    return f"bench-agent-{n:03d}"


def register_agents(target: str, first: int, count: int, chat_capacity: int) -> list[str]:
    """Agents number `first` .. `first + count - 1`, in teams of TEAM_SIZE (a new team every
    TEAM_SIZE agents, so no team leaves the 10-16 span of control), logged in and ready."""
    ids = [agent_id(n) for n in range(first, first + count)]
    with grpc.insecure_channel(target) as channel:
        stub = agents_pb2_grpc.AgentsServiceStub(channel)
        for n, aid in zip(range(first, first + count), ids, strict=True):
            team = f"bench-team-{n // TEAM_SIZE}"
            if n % TEAM_SIZE == 0:
                stub.CreateTeam(apb.CreateTeamRequest(team_id=team, name=f"Bench {n // TEAM_SIZE}"), timeout=10)
            stub.RegisterAgent(  # one at a time: joining changes the team aggregate
                apb.RegisterAgentRequest(
                    agent_id=aid,
                    name=f"Bench agent {n}",
                    team_id=team,
                    seniority=apb.CONSULTANT,
                    skills=[
                        apb.Skill(name="customer_service", proficiency=5),
                        apb.Skill(name="lang:it", proficiency=5),
                    ],
                    channels=[apb.ChannelCapacity(channel=apb.CHAT, max_concurrent=chat_capacity)],
                ),
                timeout=10,
            )
        for transition in (Transition.LOG_IN, Transition.GO_READY):  # agents are independent: all at once
            calls = [
                stub.ChangeState.future(apb.ChangeStateRequest(agent_id=aid, transition=transition), timeout=30)
                for aid in ids
            ]
            for call in calls:
                call.result()
    return ids


def wait_agents_ready(target: str, expected: int, timeout_s: float = 60.0) -> None:
    """Until the router's own picture (its Kafka feed) shows `expected` agents ready (or at work)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = routing_pb2_grpc.RoutingServiceStub(channel)
        while True:
            stats = stub.GetQueueStats(pb.GetQueueStatsRequest(queue_id=QUEUE_ID), timeout=10)
            if stats.agents_ready + stats.agents_busy >= expected:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router sees {stats.agents_ready}/{expected} agents ready")
            time.sleep(0.2)


def event_store_size(mongo_url: str, database: str) -> int | None:
    try:
        import pymongo

        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        try:
            # Events only: the commit intents share the collection.
            return int(client[database]["event_store"].count_documents({"event_id": {"$exists": True}}))
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


def _warmup_sentence(warmup: dict[str, Any] | None, cfg: dict[str, Any]) -> str:
    if not warmup:
        return ""
    if warmup["jit_pct_last_round"] is None:
        return f"  Warm-up: {warmup['seconds']:g} s."
    verdict = "settled" if warmup["settled"] else f"not settled within BENCH_WARMUP_MAX_S ({cfg['warmup_max_s']:g} s)"
    return (
        f"  Warm-up: {warmup['seconds']:g} s, until the broker's JIT compiler threads used "
        f"{warmup['jit_pct_last_round']:g}% of a core over {WARMUP_ROUND_S:g} s ({verdict}; "
        f"limit {cfg['jit_settled_pct']:g}%)."
    )


def _yardstick_lines(stick: dict[str, Any] | None, steps: list[dict[str, Any]]) -> list[str]:
    if not stick:
        return []
    cpu = stick["cpu_percent_of_one_core"]
    lines = [
        "",
        f"Yardstick, measured in this run: the gRPC exchange alone (this client against `bench.fake_routing`, "
        f"which does no work) at {stick['rate']:g}/s took {_fmt(stick['cpu_ms_per_interaction'])} ms of CPU per "
        f"interaction ({CLIENT} {_fmt(cpu.get(CLIENT))}%, server {_fmt(cpu.get('fake routing server'))}% of a core"
        + ("" if stick["kept_up"] else "; it did not keep up")
        + ").  The platform's CPU per interaction (every process above, per interaction offered) as a multiple "
        "of it does not move with the machine's speed, as the figures above do:",
        "",
        "| target /s | CPU ms / interaction | x yardstick |",
        "| ---: | ---: | ---: |",
    ]
    for step in steps:
        ms = cpu_ms_per_interaction(step["cpu_percent_of_one_core"], step["offer_rate"])
        lines.append(
            f"| {step['target_rate']:g} | {_fmt(ms)} | {_fmt(ratio(ms, stick['cpu_ms_per_interaction']), 2)} |"
        )
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    fake = cfg["platform"] == "fake"
    steps = result["steps"]
    lines = [
        "# Routing benchmark" + (" (fake platform: the client alone)" if fake else ""),
        "",
        f"Run {result['started_utc']} on {result['machine']['cpus']} CPUs ({result['machine']['platform']}), "
        f"commit {result['git']['commit']}"
        + (" with uncommitted changes" if result["git"]["uncommitted_changes_outside_bench"] else "")
        + f"; took {result['wall_s']:.0f} s.  Command: `{result['command']}`.",
        "",
        f"Agents: at least {cfg['agents']}, and enough that {cfg['chat_capacity']} chats each cover "
        f"{cfg['slot_s']:g} s (or 3x the last step's p99 handling time) of handling per interaction at the "
        "step's rate; bots accept/end/complete at once; "
        f"open-loop steps of {cfg['step_s']:g} s from {cfg['workers']} client process(es) (grpc.aio"
        + (f", nice {cfg['client_nice']}" if result["client"].get("nice_applied") and cfg["client_nice"] else "")
        + ")"
        + (", services instrumented (bench.instrument)" if cfg["instrument"] and not fake else "")
        + ("; the routing server is `bench.fake_routing`, which does no work" if fake else "")
        + ".  Latency = CreateInteraction sent -> offer on the agent's stream (ms)."
        + _warmup_sentence(result.get("warmup"), cfg),
        "",
        "| target /s | n | sent /s | offers /s | completed /s | achieved / target | p50 | p95 | p99 | max "
        "| p99 / 50 ms | p99 from schedule | backlog at end | drain s | errors + never offered | kept up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| :---: |",
    ]
    for step in steps:
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
        "The client and the agents, per step: the client's CPU per interaction (all its processes, from the "
        "step's start until its last interaction completed), its event loops' lag (how late a timer "
        "fired: what the client may add to a latency), its pacing lag (create sent after its scheduled time), "
        "how long an interaction held a chat slot (offer -> completed) and the most slots in use at once:",
        "",
        "| target /s | client CPU ms / interaction | client CPU % of one core | loop lag p99 / max ms "
        "| pacing lag p99 / max ms | agents | slots | handling p99 ms | peak in use | verdict |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for step in steps:
        lag, pacing = step["client_loop_lag_ms"], step["client_pacing_lag_ms"]
        lines.append(
            f"| {step['target_rate']:g} | {_fmt(step['client_cpu_ms_per_interaction'], 2)} "
            f"| {_fmt(step['cpu_percent_of_one_core'].get(CLIENT))} | {_fmt(lag['p99'])} / {_fmt(lag['max'])} "
            f"| {_fmt(pacing['p99'])} / {_fmt(pacing['max'])} | {step['agents']} | {step['slots']} "
            f"| {_fmt(step['handling_ms']['p99'])} | {step['peak_in_progress']} "
            f"({_fmt(step['slots_peak_used'], 2)}) | {client_verdict(step)} |"
        )
    lines += ["", "CPU, % of one core over each step (200% = the whole machine):", ""]
    labels = sorted({label for step in steps for label in step["cpu_percent_of_one_core"]} - {"total"})
    labels.append("total")
    lines.append("| target /s | " + " | ".join(labels) + " |")
    lines.append("| ---: |" + " ---: |" * len(labels))
    for step in steps:
        cpu = step["cpu_percent_of_one_core"]
        lines.append(f"| {step['target_rate']:g} | " + " | ".join(_fmt(cpu.get(label)) for label in labels) + " |")
    lines += _yardstick_lines(result.get("yardstick"), steps)
    telemetry = result.get("telemetry_received")
    if telemetry:
        spans = ", ".join(f"{service} {count}" for service, count in sorted(telemetry["spans"].items()))
        lines += [
            "",
            f"Tracing on, exported over OTLP to `bench.trace_sink` (the {TRACE_SINK} column), which "
            f"received {sum(telemetry['spans'].values())} spans in the whole run ({spans}) and "
            f"{telemetry['metric_exports']} metric exports.",
        ]
    if steps and "where_time_goes" in steps[0]:
        lines += [
            "",
            "Where the time goes, per step.  Database time is seconds of calls per second of wall time as the "
            "services see them (time queued in FerretDB included, so the sum can pass 1):",
            "",
            "| | " + " | ".join(f"{s['target_rate']:g}/s" for s in steps) + " |",
            "| --- |" + " ---: |" * len(steps),
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
            lines.append(f"| {label} | " + " | ".join(str(cell(s)) for s in steps) + " |")
    for service_name in ("routing", "agents"):
        per_step = result.get("server_timings", {}).get(service_name)
        if not per_step:
            continue
        lines += ["", f"Server-side timings in the {service_name} service (ms; per step: calls/s, mean, p99):", ""]
        names = sorted({name for timings in per_step for name in timings})
        lines.append("| call | " + " | ".join(f"{s['target_rate']:g}/s" for s in steps) + " |")
        lines.append("| --- |" + " --- |" * len(steps))
        for name in names:
            cells = []
            for timings in per_step:
                t = timings.get(name)
                cells.append(f"{t['per_s']:g}/s, {_fmt(t['mean_ms'])}, {_fmt(t['p99_ms'])}" if t else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Raw figures: `{result['json_file']}`.", ""]
    return "\n".join(lines)


def client_verdict(step: dict[str, Any]) -> str:
    """Whether the client or the agents' slots, rather than the platform, may have set a step's figures."""
    notes = []
    if (step["slots_peak_used"] or 0) >= SLOTS_FULL:
        notes.append("all slots in use at times: agents may have limited")

    def visible(lag_ms: float | None) -> bool:  # against the goal and against what was measured
        p99 = step["latency_ms"]["p99"] or 0.0
        return lag_ms is not None and lag_ms > 0.2 * GOAL_P99_MS and lag_ms > 0.1 * p99

    if visible(step["client_loop_lag_ms"]["p99"]):
        notes.append("the client's own loop lag is a visible part of the latency")
    if visible(step["client_pacing_lag_ms"]["p99"]):
        notes.append("the client sent late: arrivals burstier than scheduled")
    return "; ".join(notes) or "ok"


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


class Platform:
    """What the load runs against: the real services on a throw-away stack, or bench.fake_routing."""

    def __init__(self, cfg: Config, tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.named: dict[int, str] = {}
        self.routing_target = ""
        self.agents_target = ""
        self.mongo_url = ""
        self.namespace = f"bench{uuid.uuid4().hex[:8]}"
        self.agents: list[str] = []
        self._services: list[ServiceProcess] = []
        self.sink_out = tmp / "trace_sink.json"

    @contextmanager
    def up(self) -> Iterator[Platform]:
        if self.cfg.platform == "fake":
            port = free_port()
            env = {"PYTHONPATH": _pythonpath(), "BENCH_FAKE_PORT": str(port)}
            fake = ServiceProcess("bench.fake_routing", env, self.tmp / "fake_routing.log")
            self.routing_target = f"127.0.0.1:{port}"
            with self._running({fake: "fake routing server"}):
                fake.wait_healthy(self.routing_target)
                yield self
            return
        # A deployment's broker, JIT included: the warm-up covers its compiling.
        with ephemeral_stack(self.tmp / "stack", short_lived=False) as endpoints:
            state = self.tmp / "state"
            state.mkdir()
            agents_port, routing_port, sink_port = free_port(), free_port(), free_port()
            # Telemetry goes to a receiver, as it would to a collector (bench.trace_sink).
            sink = ServiceProcess(
                "bench.trace_sink",
                {"PYTHONPATH": _pythonpath(), "BENCH_SINK_PORT": str(sink_port), "BENCH_SINK_OUT": str(self.sink_out)},
                state / "trace_sink.log",
            )
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "KAFKA_BOOTSTRAP": endpoints["kafka_bootstrap"],
                "MONGO_URL": endpoints["mongo_url"],
                "CENTRALINO_NAMESPACE": self.namespace,
                "CENTRALINO_STATE_DIR": str(state),
                "CENTRALINO_RELAY_INTERVAL_S": "0.2",
                "AGENTS_GRPC_PORT": str(agents_port),
                "ROUTING_GRPC_PORT": str(routing_port),
                "PYTHONPATH": _pythonpath(),
                "CENTRALINO_ROUTING_QUEUES": str(queues_file(self.tmp)),
                **dict(self.cfg.service_env),
            }
            self.mongo_url = env["MONGO_URL"]
            self.agents_target, self.routing_target = f"127.0.0.1:{agents_port}", f"127.0.0.1:{routing_port}"
            agents_server = service(
                "services.agents.server", env, state / "agents.log", self.tmp / "agents.timings", self.cfg
            )
            routing_server = service(
                "services.routing.server", env, state / "routing.log", self.tmp / "routing.timings", self.cfg
            )
            # The agents projection (Faust) runs too: it shares the two cores with the rest.
            agents_worker = ServiceProcess("services.agents.worker", env, state / "worker.log")
            running = {
                sink: TRACE_SINK,
                agents_server: "agents server",
                agents_worker: "agents projection",
                routing_server: "routing server",
            }
            with self._running(running):
                agents_server.wait_healthy(self.agents_target, timeout_s=60)
                routing_server.wait_healthy(self.routing_target, timeout_s=60)
                yield self

    @contextmanager
    def _running(self, services: dict[ServiceProcess, str]) -> Iterator[None]:
        started = []
        try:
            for process, label in services.items():
                process.start()
                started.append(process)
                self.named[process.pid] = label
            self._services = started
            yield
        finally:
            for process in reversed(started):
                process.stop()

    def check_alive(self) -> None:
        for process in self._services:
            process.check_alive()

    def ensure_agents(self, count: int) -> list[str]:
        """At least `count` agents logged in and ready, as the router sees them."""
        if count > len(self.agents):
            if self.cfg.platform == "fake":
                self.agents += [agent_id(n) for n in range(len(self.agents), count)]
            else:
                self.agents += register_agents(
                    self.agents_target, len(self.agents), count - len(self.agents), self.cfg.chat_capacity
                )
                wait_agents_ready(self.routing_target, len(self.agents))
        return list(self.agents)

    def event_store_size(self) -> int | None:
        return event_store_size(self.mongo_url, self.namespace) if self.mongo_url else None


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT), str(ROOT / "gen")])


WARMUP_ROUND_S = 10.0


@dataclass
class Warmup:
    seconds: float = 0.0
    jit_pct_last_round: float | None = None  # the broker's compiler threads, % of one core
    settled: bool = False


def warm_up(cfg: Config, client: Client, meter: CpuMeter) -> Warmup:
    """Warm-up load in rounds until at least `warmup_s` passed and the broker's JIT has
    settled (its compiler threads under `jit_settled_pct` % of a core over the last round),
    or `warmup_max_s` passed: the steps then measure the steady state a deployment runs in."""
    brokers = meter.pids_of("kafka")  # none with testcontainers' or an outside broker: time alone
    rate, began, done = min(20.0, cfg.steps[0]), time.monotonic(), Warmup()
    for round_no in range(math.ceil(max(cfg.warmup_max_s, cfg.warmup_s) / WARMUP_ROUND_S)):
        jit_before, start = jit_cpu_seconds(brokers), time.monotonic() + 0.1
        client.send_step(-1, rate, WARMUP_ROUND_S, start, label=f"w{round_no}")
        time.sleep(max(start + WARMUP_ROUND_S - time.monotonic(), 0.0))
        done.jit_pct_last_round = round(100.0 * (jit_cpu_seconds(brokers) - jit_before) / WARMUP_ROUND_S, 1)
        done.seconds = round(time.monotonic() - began, 1)
        done.settled = not brokers or done.jit_pct_last_round < cfg.jit_settled_pct
        if done.seconds >= cfg.warmup_s and done.settled:
            break
    client.drain(-1, cfg.drain_s)
    print(
        f"bench: warmed up for {done.seconds:g} s; the broker's JIT used "
        f"{done.jit_pct_last_round}% of a core in the last round",
        flush=True,
    )
    return done


def run_steps(cfg: Config, plat: Platform, client: Client, meter: CpuMeter) -> tuple[list[StepWindow], Warmup | None]:
    windows: list[StepWindow] = []
    client.add_agents(plat.ensure_agents(cfg.agents_for(cfg.steps[0])))
    print(f"bench: {len(client.agents)} agents ready; load steps {[f'{r:g}' for r in cfg.steps]}/s", flush=True)
    warmup = warm_up(cfg, client, meter) if cfg.warmup_s > 0 else None
    began = time.monotonic()
    for index, rate in enumerate(cfg.steps):
        if windows and time.monotonic() - began + cfg.step_s + cfg.drain_s > cfg.budget_s:
            print(f"  time budget reached; skipping {rate:g}/s and above", flush=True)
            break
        handling = (step_metrics(client, windows[-1])["handling_ms"]["p99"] or 0.0) / 1000 if windows else 0.0
        agents = plat.ensure_agents(cfg.agents_for(rate, handling))
        client.add_agents(agents)
        start = time.monotonic() + 0.1
        window = StepWindow(
            index, rate, start, start + cfg.step_s, agents=len(agents), started_with_backlog=client.backlog()
        )
        client.send_step(index, rate, cfg.step_s, start)
        time.sleep(max(start - time.monotonic(), 0.0))
        cpu_before, cpu_at = meter.snapshot(refresh=True), time.monotonic()
        while (left := window.end - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
            plat.check_alive()
            client.check_alive()
        window.cpu = cpu_percent(cpu_before, meter.snapshot(), time.monotonic() - cpu_at)
        with client.lock:
            offered = _count_in(client.offer_times, window.start, window.end) / cfg.step_s
        # A step far behind is over: drain it briefly (for its figures), not for the full BENCH_DRAIN_S.
        window.drained_at = client.drain(index, cfg.drain_s if offered >= 0.8 * rate else min(cfg.drain_s, 5.0))
        window.settled_at = time.monotonic()
        window.client_cpu_s = meter.snapshot().get(CLIENT, 0.0) - cpu_before.get(CLIENT, 0.0)
        windows.append(window)
        verdict = step_metrics(client, window)
        print(
            f"  {rate:>5g}/s: offers {verdict['offer_rate']:.1f}/s, p50 {verdict['latency_ms']['p50']} ms, "
            f"p99 {verdict['latency_ms']['p99']} ms, backlog at end {verdict['backlog_at_end']}, "
            f"kept up: {verdict['kept_up']}; client {verdict['client_cpu_ms_per_interaction']} ms CPU/interaction, "
            f"loop lag p99 {verdict['client_loop_lag_ms']['p99']} ms; "
            f"slots {verdict['peak_in_progress']}/{verdict['slots']} at peak",
            flush=True,
        )
        if not verdict["kept_up"]:
            rest = [f"{r:g}" for r in cfg.steps[index + 1 :]]
            if rest:
                print(f"  saturated at {rate:g}/s; not running {', '.join(rest)}/s", flush=True)
            break
    return windows, warmup


YARDSTICK_RATE = 100.0
YARDSTICK_S = 15.0


def yardstick(cfg: Config, tmp: Path) -> dict[str, Any]:
    """The gRPC exchange alone, measured in this run: this client against a routing server
    that does no work (`bench.fake_routing`), at YARDSTICK_RATE for YARDSTICK_S.  Its CPU per
    interaction (client and server) is what the machine charges for the calls themselves."""
    fake = replace(
        cfg,
        platform="fake",
        steps=(YARDSTICK_RATE,),
        step_s=YARDSTICK_S,
        warmup_s=5.0,
        warmup_max_s=5.0,
        instrument=False,
        sample_hz=0.0,
    )
    with Platform(fake, tmp).up() as plat:
        client = Client(fake, plat.routing_target)
        client.start()
        try:
            windows, _ = run_steps(fake, plat, client, CpuMeter({**plat.named, **{p: CLIENT for p in client.pids}}))
        finally:
            client.stop()
        step = step_metrics(client, windows[0])
    return {
        "rate": YARDSTICK_RATE,
        "seconds": YARDSTICK_S,
        "kept_up": step["kept_up"],
        "cpu_percent_of_one_core": step["cpu_percent_of_one_core"],
        "cpu_ms_per_interaction": cpu_ms_per_interaction(step["cpu_percent_of_one_core"], step["offer_rate"]),
    }


def cpu_ms_per_interaction(cpu: dict[str, float], rate: float | None) -> float | None:
    """CPU milliseconds of every measured process per interaction, from % of one core at `rate`/s."""
    return round(cpu["total"] * 10.0 / rate, 3) if rate and "total" in cpu else None


def run(cfg: Config) -> dict[str, Any]:
    began_wall = time.monotonic()
    started = datetime.now(UTC)
    most_agents = cfg.agents_for(max(cfg.steps))
    if cfg.platform == "real" and most_agents + 32 > ROUTING_GRPC_WORKERS:
        print(
            f"warning: up to {most_agents} offer streams hold as many of the routing server's "
            f"{ROUTING_GRPC_WORKERS} gRPC worker threads (CENTRALINO_GRPC_MAX_WORKERS); unary calls may starve",
            flush=True,
        )
    tmp = Path(tempfile.mkdtemp(prefix="centralino-bench-"))
    print(f"bench: work dir {tmp}", flush=True)
    try:
        with Platform(cfg, tmp).up() as plat:
            print(f"bench: platform ({cfg.platform}) up after {time.monotonic() - began_wall:.0f} s", flush=True)
            client = Client(cfg, plat.routing_target)
            client.start()
            try:
                meter = CpuMeter({**plat.named, **{pid: CLIENT for pid in client.pids}})
                windows, warmup = run_steps(cfg, plat, client, meter)
            finally:
                client.stop()
            plat.check_alive()
            stored_events = plat.event_store_size()
        stick = yardstick(cfg, tmp / "yardstick") if cfg.platform == "real" and cfg.yardstick else None
        telemetry = json.loads(plat.sink_out.read_text()) if plat.sink_out.is_file() else None
        steps = [step_metrics(client, window) for window in windows]
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
        command = "make bench" if cfg.platform == "real" else "BENCH_PLATFORM=fake make bench"
        result: dict[str, Any] = {
            "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command
            if "BENCH_STEPS" not in os.environ
            else f"BENCH_STEPS={os.environ['BENCH_STEPS']} " + command,
            "wall_s": round(time.monotonic() - began_wall, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "grpc": grpc.__version__,
            },
            "git": git_info(),
            "config": asdict(cfg),
            "goals": goals(steps),
            "warmup": asdict(warmup) if warmup is not None else None,
            "yardstick": stick,
            "steps": steps,
            "client": {
                "workers": cfg.workers,
                "grpc_experiments": cfg.client_grpc_experiments,
                "nice": sorted({n for n, _ in client.nice.values()}),
                "nice_applied": all(ok for _, ok in client.nice.values()),
                "agents": len(client.agents),
                "unknown_offers": client.unknown_offers,
                "duplicate_offers": client.duplicate_offers,
                "stream_errors": dict(client.stream_errors),
                "interactions_total": sum(1 for i in client.items.values() if i.step >= -1),
            },
            "event_store_documents_at_end": stored_events,
            "telemetry_received": telemetry,
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
    fake = result["config"]["platform"] == "fake"  # the client alone: never in place of the real figures
    json_path = out_dir / f"routing-{'fake-' if fake else ''}{stamp}.json"
    try:
        result["json_file"] = str(json_path.relative_to(ROOT))
    except ValueError:
        result["json_file"] = str(json_path)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path = out_dir / ("latest-fake.md" if fake else "latest.md")
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
