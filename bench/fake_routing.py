"""A stand-in routing server that does no work, to measure the bench client alone.

`python -m bench.fake_routing` serves, on 127.0.0.1:$BENCH_FAKE_PORT, the RoutingService calls the bench uses:
CreateInteraction offers the interaction at once, round robin, to one of the agents
whose StreamOffers is open; AcceptOffer, EndInteraction and CompleteInteraction answer
at once; GetQueueStats counts the open streams as agents ready.  No Kafka, no database.
`BENCH_PLATFORM=fake make bench` drives it at the usual steps, so the figures show how
far the client (pacing, bots, latency bookkeeping) goes and what CPU it needs per
interaction when the platform is never the limit.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import grpc
from centralino.v1 import routing_pb2 as pb
from centralino.v1 import routing_pb2_grpc
from grpc_health.v1 import health, health_pb2_grpc


class FakeRouting(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self) -> None:
        self.streams: dict[str, asyncio.Queue[pb.Offer]] = {}
        self.order: list[str] = []
        self.next = 0

    async def CreateInteraction(  # noqa: N802 (gRPC names)
        self, request: pb.CreateInteractionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateInteractionResponse:
        if self.order:
            agent = self.order[self.next % len(self.order)]
            self.next += 1
            self.streams[agent].put_nowait(pb.Offer(interaction_id=request.interaction_id, queue_id="fake"))
        return pb.CreateInteractionResponse(interaction_id=request.interaction_id, queue_id="fake")

    async def StreamOffers(  # noqa: N802
        self, request: pb.StreamOffersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Offer]:
        queue: asyncio.Queue[pb.Offer] = asyncio.Queue()
        self.streams[request.agent_id] = queue
        self.order.append(request.agent_id)
        await context.send_initial_metadata(())
        try:
            while True:
                yield await queue.get()
        finally:
            self.order.remove(request.agent_id)
            del self.streams[request.agent_id]

    async def _done(self, interaction_id: str) -> pb.InteractionResponse:
        return pb.InteractionResponse(interaction_id=interaction_id, status=pb.COMPLETED)

    async def AcceptOffer(  # noqa: N802
        self, request: pb.OfferDecision, context: grpc.aio.ServicerContext
    ) -> pb.InteractionResponse:
        return await self._done(request.interaction_id)

    async def EndInteraction(  # noqa: N802
        self, request: pb.OfferDecision, context: grpc.aio.ServicerContext
    ) -> pb.InteractionResponse:
        return await self._done(request.interaction_id)

    async def CompleteInteraction(  # noqa: N802
        self, request: pb.CompleteInteractionRequest, context: grpc.aio.ServicerContext
    ) -> pb.InteractionResponse:
        return await self._done(request.interaction_id)

    async def GetQueueStats(  # noqa: N802
        self, request: pb.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.QueueStats:
        return pb.QueueStats(queue_id=request.queue_id, agents_ready=len(self.order))


async def serve(port: int) -> None:
    server = grpc.aio.server()
    routing_pb2_grpc.add_RoutingServiceServicer_to_server(FakeRouting(), server)  # type: ignore[no-untyped-call]
    # The standard health check, as the real services serve it: the bench waits on it alike.
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(os.environ["BENCH_FAKE_PORT"])))
