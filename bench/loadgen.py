"""One load-generator process of the routing benchmark (started by bench.routing).

`python -m bench.loadgen FD TARGET INDEX WORKERS` talks to the coordinator over the
socket FD (multiprocessing.connection framing, pickled tuples) and to the routing
service at TARGET with grpc.aio on one event loop:

* ("agents", [agent ids]) opens one StreamOffers per agent (this worker's share of the
  agents) and answers ("ready", INDEX, n) once the server has taken every stream;
  a bot answers each offer arriving on them at once (AcceptOffer, EndInteraction,
  CompleteInteraction);
* ("step", label, rate, start, duration, tag) sends this worker's share of the step's
  CreateInteraction calls, open loop: interaction i is due at start + i/rate and worker
  w sends the i with i % WORKERS == w;
* ("stop",) ends the streams and the process.

With BENCH_CLIENT_NICE (e.g. -5) it first raises its own scheduling priority.

It keeps nothing per interaction once its bot is done (but the offers it has seen, to
drop a repeated delivery): every fact goes to the coordinator as it happens, in batches
every FLUSH_S, as tuples
("sent" | "created" | "offer" | "done" | "error" | "dup" | "lag" | "stream_error", ...).
Times are time.monotonic(), CLOCK_MONOTONIC, one clock for every process on the
machine: an interaction created by one worker and offered to an agent of another is
measured across the two on the same clock.

"lag" samples are this loop's own delay: a timer due every LAG_PERIOD_S is late by
how long the loop was busy with something else, about what this client may add to a
latency it measures.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Coroutine
from multiprocessing.connection import Connection
from typing import Any

import grpc
from centralino.v1 import agents_pb2 as apb
from centralino.v1 import routing_pb2 as pb
from centralino.v1 import routing_pb2_grpc

RPC_TIMEOUT_S = 30.0
FLUSH_S = 0.1
LAG_PERIOD_S = 0.05


def interaction_id(tag: str, label: str, i: int) -> str:
    return f"bench-{tag}-{label}-{i}"


class Worker:
    def __init__(self, conn: Connection, target: str, index: int, workers: int) -> None:
        self.conn = conn
        self.index = index
        self.workers = workers
        self.target = target
        self.events: list[tuple[Any, ...]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.listeners: list[asyncio.Task[None]] = []
        self.seen: set[tuple[str, int, int]] = set()
        self.commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- agents' side ----

    async def listen(self, agent_id: str, ready: asyncio.Event) -> None:
        call = self.stub.StreamOffers(pb.StreamOffersRequest(agent_id=agent_id))
        try:
            await call.initial_metadata()
            ready.set()
            async for offer in call:
                now = time.monotonic()
                iid = offer.interaction_id
                key = (iid, offer.expires_at.seconds, offer.expires_at.nanos)
                if key in self.seen:  # delivered at least once: a desk deduplicates
                    self.events.append(("dup", iid, now))
                    continue
                self.seen.add(key)
                self.events.append(("offer", iid, agent_id, now))
                self.spawn(self.bot(agent_id, iid))
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as error:
            ready.set()
            if error.code() != grpc.StatusCode.CANCELLED:
                self.events.append(("stream_error", agent_id, error.code().name))

    async def bot(self, agent_id: str, iid: str) -> None:
        """Accept at once, end, wrap up, so the capacity frees as fast as the platform allows."""
        decision = pb.OfferDecision(agent_id=agent_id, interaction_id=iid)
        step = "AcceptOffer"
        try:
            await self.stub.AcceptOffer(decision, timeout=RPC_TIMEOUT_S)
            step = "EndInteraction"
            await self.stub.EndInteraction(decision, timeout=RPC_TIMEOUT_S)
            step = "CompleteInteraction"
            request = pb.CompleteInteractionRequest(
                agent_id=agent_id, interaction_id=iid, wrap_up_code="ok", disposition="resolved"
            )
            await self.stub.CompleteInteraction(request, timeout=RPC_TIMEOUT_S)
            self.events.append(("done", iid, time.monotonic()))
        except grpc.aio.AioRpcError as error:
            self.events.append(("error", iid, f"{step}: {error.code().name}"))

    async def open_streams(self, agent_ids: list[str]) -> None:
        readies = []
        for agent_id in agent_ids:
            ready = asyncio.Event()
            readies.append(ready)
            self.listeners.append(asyncio.get_running_loop().create_task(self.listen(agent_id, ready)))
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), timeout=60)
        self.conn.send([("ready", self.index, len(agent_ids))])

    # ---- customers' side ----

    async def create(self, iid: str) -> None:
        request = pb.CreateInteractionRequest(
            interaction_id=iid,
            channel=apb.CHAT,
            direction=pb.INBOUND,
            customer_id=f"{iid}@example.com",
            language="it",
            department="customer_service",
            priority=0,
        )
        self.events.append(("sent", iid, time.monotonic()))
        try:
            await self.stub.CreateInteraction(request, timeout=RPC_TIMEOUT_S)
            self.events.append(("created", iid, time.monotonic()))
        except grpc.aio.AioRpcError as error:
            self.events.append(("error", iid, f"CreateInteraction: {error.code().name}"))

    async def pace(self, label: str, rate: float, start: float, duration: float, tag: str) -> None:
        """Open loop: interaction i is due at start + i/rate whatever happened before."""
        for i in range(self.index, round(rate * duration), self.workers):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.spawn(self.create(interaction_id(tag, label, i)))

    # ---- plumbing ----

    async def flush(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            if self.events:
                batch, self.events = self.events, []
                self.conn.send(batch)

    async def watch_lag(self) -> None:
        while True:
            due = time.monotonic() + LAG_PERIOD_S
            await asyncio.sleep(LAG_PERIOD_S)
            now = time.monotonic()
            self.events.append(("lag", now, now - due))

    def on_command(self) -> None:
        while self.conn.poll():
            try:
                self.commands.put_nowait(self.conn.recv())
            except EOFError:
                self.commands.put_nowait(("stop",))
                return

    async def serve(self) -> None:
        # One HTTP/2 connection for this worker's streams, creates and bot calls alike (made here: a
        # grpc.aio channel belongs to the loop running when it is made).
        self.channel = grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = routing_pb2_grpc.RoutingServiceStub(self.channel)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self.on_command)
        background = [loop.create_task(self.flush()), loop.create_task(self.watch_lag())]
        try:
            while True:
                command = await self.commands.get()
                if command[0] == "agents":
                    await self.open_streams(command[1])
                elif command[0] == "step":
                    _, label, rate, start, duration, tag = command
                    self.spawn(self.pace(label, rate, start, duration, tag))
                elif command[0] == "stop":
                    break
        finally:
            loop.remove_reader(self.conn.fileno())
            for task in [*self.listeners, *self.tasks, *background]:
                task.cancel()
            await asyncio.gather(*self.listeners, *self.tasks, *background, return_exceptions=True)
            if self.events:
                self.conn.send(self.events)
            self.conn.send([("bye", self.index)])
            await self.channel.close()


def prioritise(nice: int) -> bool:
    """Run ahead of the services when the machine is busy, so the scheduler's delays go to the
    platform's figures, not into this client's clock readings.  Before any thread starts (Linux
    sets the priority per thread; new threads inherit it).  Lowering the nice value needs root."""
    if not nice:
        return True
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        return False
    return True


def main() -> None:
    fd, target, index, workers = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prioritised = prioritise(int(os.environ.get("BENCH_CLIENT_NICE", "0") or 0))
    gc.freeze()  # what the imports made lives for good: keep it out of every collection
    conn = Connection(fd)
    conn.send([("nice", index, os.getpriority(os.PRIO_PROCESS, 0), prioritised)])
    try:
        asyncio.run(Worker(conn, target, index, workers).serve())
    finally:
        conn.close()
    os._exit(0)  # skip gRPC's slow teardown at interpreter exit


if __name__ == "__main__":
    main()
