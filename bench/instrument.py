"""Runs a service module with timers around the calls that matter for routing latency.

`python -m bench.instrument` runs the module named by `BENCH_TARGET_MODULE` (e.g.
`services.routing.server`) as `__main__`, after wrapping a few methods of the
event store, the router, the agents application and the Kafka feed with timers.
Nothing in `services/` is changed: the wrappers are installed on the classes in
this process only, and a method that is not there (the platform changed) is skipped,
so the bench still runs and that timer is simply missing from the report.  At exit
every timed call, as (start, duration, extra) on the system-wide monotonic clock,
is pickled to `BENCH_TIMINGS_OUT`, so the bench can cut the figures by load step.
With `BENCH_SAMPLE_HZ` set, a sampler thread also records every thread's stack that
often (a poor man's py-spy) into `BENCH_SAMPLES_OUT`, as collapsed stacks per thread
name.

The overhead is two clock reads and one list append per timed call (about a
microsecond, against calls that take milliseconds).
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import pickle
import runpy
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

Record = tuple[float, float, float]  # start (monotonic), duration (s), extra (e.g. events loaded)
COMMIT = "eventstore group commit (intent + inserts)"  # extra: events written
RECORDS: dict[str, list[Record]] = {}
SAMPLES: Counter[tuple[str, str]] = Counter()  # (thread group, collapsed stack) -> samples


def _slot(name: str) -> list[Record]:
    return RECORDS.setdefault(name, [])


def timed(
    owner: Any,
    attr: str,
    name: str,
    extra: Callable[[Any], float] | None = None,
    extra_of_args: Callable[..., float] | None = None,
) -> bool:
    """Replace `owner.attr` with a wrapper that records every call under `name`; `extra` reads
    a figure off the result, `extra_of_args` off the arguments.  False if there is no such method."""
    original = getattr(owner, attr, None)
    if original is None:
        return False
    records = _slot(name)
    failures = _slot(name + " (raised)")

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        try:
            result = original(*args, **kwargs)
        except BaseException:
            failures.append((start, time.monotonic() - start, 0.0))
            raise
        figure = extra(result) if extra else extra_of_args(*args, **kwargs) if extra_of_args else 0.0
        records.append((start, time.monotonic() - start, float(figure)))
        return result

    setattr(owner, attr, wrapper)
    return True


class TimedLock:
    """A re-entrant lock that records how long callers wait for it and how long it is held
    (outermost acquisitions only); `extra` is 1.0 when the router thread holds it."""

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._wait = _slot(name + " wait")
        self._hold = _slot(name + " hold")
        self._local = threading.local()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        start = time.monotonic()
        got = bool(self._inner.acquire(blocking, timeout))
        if got:
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                now = time.monotonic()
                self._wait.append((start, now - start, 0.0))
                self._local.since = now
            self._local.depth = depth + 1
        return got

    def release(self) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            since = self._local.since
            router = 1.0 if threading.current_thread().name == "router" else 0.0
            self._hold.append((since, time.monotonic() - since, router))
        self._inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def _size(result: Any) -> float:
    try:
        return float(len(result))
    except TypeError:
        return 0.0


def _number(result: Any) -> float:
    return float(result) if isinstance(result, int | float) else 0.0


def _events_in(_store: Any, writes: Any, *_: Any) -> float:
    return float(sum(len(write.envelopes) for write in writes))


def instrument_common() -> None:
    from services.kernel import eventstore, outbox

    timed(eventstore.EventStore, "append", "eventstore.append (insert_many)")
    # The group commit (one thread writes many requests' events at once), where there is one.
    timed(eventstore.EventStore, "_commit_writes", COMMIT, extra_of_args=_events_in)
    # The intent and the events go in one ordered insert (two more only when it stops early).
    timed(eventstore.EventStore, "_insert_events", "eventstore group commit: inserts", extra_of_args=_events_in)
    timed(eventstore.EventStore, "load", "eventstore.load (one aggregate's history)", _size)
    timed(eventstore.EventStore, "unpublished", "outbox: find unpublished", _size)
    timed(eventstore.EventStore, "mark_published", "outbox: mark published")
    timed(outbox, "publish", "outbox: publish batch to Kafka (acks=all)")
    timed(
        outbox.OutboxRelay,
        "drain_once",
        "outbox: drain_once (one wake-up; loops until nothing is unpublished)",
        _number,
    )


def time_gc() -> None:
    """Record every collection of Python's cyclic garbage collector: a pause of the whole
    process (every thread waits), which a latency percentile feels."""
    started: dict[int, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        generation = info["generation"]
        if phase == "start":
            started[generation] = time.monotonic()
        elif generation in started:
            begun = started.pop(generation)
            _slot(f"python gc collection, generation {generation}").append(
                (begun, time.monotonic() - begun, float(info.get("collected", 0)))
            )

    gc.callbacks.append(callback)


def instrument_routing() -> None:
    from services.routing import agent_feed, agents_port, api, offers, router

    timed(agents_port.AgentsPort, "change", "agents gRPC ChangeState (client side)")
    timed(
        agents_port.AgentsPort,
        "_send_batch",
        "agents gRPC ChangeStates batch (client side)",
        extra_of_args=lambda _port, batch, *_: float(len(batch)),
    )
    timed(router.Router, "create", "router.create")
    timed(router.Router, "accept", "router.accept")
    timed(router.Router, "end", "router.end")
    timed(router.Router, "complete", "router.complete")
    timed(router.Router, "route_once", "router.route_once (pass)", _number)
    timed(router.Router, "_offer", "router._offer (save + reserve + publish)")
    timed(router.Router, "_candidates", "router._candidates", lambda r: _size(r[0]))
    timed(router.Router, "expire_offers", "router.expire_offers", _number)
    timed(router.Router, "reconcile", "router.reconcile", _number)
    timed(router.Router, "_save", "router._save (append + fold)")
    timed(offers.OfferBus, "publish", "offer bus publish")
    for method in ("CreateInteraction", "AcceptOffer", "EndInteraction", "CompleteInteraction"):
        timed(api.RoutingServicer, method, f"grpc handler {method}")

    lag = _slot("agent feed lag (event time -> folded)")
    original_apply = agent_feed.AgentFeed.apply

    def apply(self: Any, envelope: Any) -> None:
        start = time.monotonic()
        original_apply(self, envelope)
        occurred = envelope.occurred_at.seconds + envelope.occurred_at.nanos / 1e9
        lag.append((start, max(time.time() - occurred, 0.0), 0.0))

    agent_feed.AgentFeed.apply = apply  # type: ignore[method-assign]

    original_init = router.Router.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._lock = TimedLock(self._lock, "router lock")

    router.Router.__init__ = init  # type: ignore[method-assign]


def instrument_agents() -> None:
    from services.agents import api, application, domain

    timed(api.AgentsServicer, "ChangeState", "grpc handler ChangeState")
    timed(api.AgentsServicer, "ChangeStates", "grpc handler ChangeStates (batch)")
    timed(application.AgentsApplication, "change_state", "agents.change_state (load, decide, append)")
    timed(application.AgentsApplication, "change_states", "agents.change_states (batch)", _size)
    timed(application.AgentsApplication, "_agent", "agents: load + replay agent", lambda a: float(a.version))
    timed(domain, "replay", "agents: domain.replay (fold)")


def _group(name: str) -> str:
    if name.startswith("ThreadPoolExecutor"):
        return "grpc worker"
    return name.rstrip("0123456789-_ ") or name


def _sample(interval_s: float, stop: threading.Event) -> None:
    me = threading.get_ident()
    while not stop.wait(interval_s):
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack = []
            current: Any = frame
            while current is not None:
                code = current.f_code
                stack.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
                current = current.f_back
            SAMPLES[(_group(names.get(ident, "?")), ";".join(reversed(stack)))] += 1


def _dump() -> None:
    out = os.environ.get("BENCH_TIMINGS_OUT")
    if out:
        with open(out + ".tmp", "wb") as fh:
            pickle.dump({name: list(records) for name, records in RECORDS.items()}, fh)
        os.replace(out + ".tmp", out)
    samples_out = os.environ.get("BENCH_SAMPLES_OUT")
    if samples_out and SAMPLES:
        with open(samples_out, "wb") as fh:
            pickle.dump(dict(SAMPLES), fh)


def main() -> None:
    target = os.environ["BENCH_TARGET_MODULE"]
    instrument_common()
    time_gc()
    if target.startswith("services.routing"):
        instrument_routing()
    elif target.startswith("services.agents"):
        instrument_agents()
    stop = threading.Event()
    hz = float(os.environ.get("BENCH_SAMPLE_HZ", "0") or 0)
    if hz > 0:
        threading.Thread(target=_sample, args=(1.0 / hz, stop), name="bench-sampler", daemon=True).start()
    atexit.register(_dump)
    try:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        stop.set()


if __name__ == "__main__":
    main()
