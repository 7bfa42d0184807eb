"""Thin gRPC servicer: protobuf <-> primitives, domain errors <-> status codes."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc
from centralino.v1 import routing_pb2 as pb
from centralino.v1 import routing_pb2_grpc

from services.kernel.envelope import Metadata, new_id
from services.kernel.grpc_server import domain_errors_as_status
from services.routing.domain.interaction import CreateInteraction, Interaction
from services.routing.offers import OfferBus
from services.routing.router import PRODUCER, Router


def metadata_for(correlation_id: str) -> Metadata:
    return Metadata(correlation_id=correlation_id or new_id(), causation_id=new_id(), producer=PRODUCER)


def to_create_command(request: pb.CreateInteractionRequest) -> CreateInteraction:
    return CreateInteraction(
        interaction_id=request.interaction_id or new_id(),
        channel=request.channel,
        direction=request.direction,
        customer_id=request.customer_id,
        language=request.language,
        department=request.department,
        priority=request.priority,
        attributes=dict(request.attributes),
    )


def to_response(interaction: Interaction) -> pb.InteractionResponse:
    return pb.InteractionResponse(
        interaction_id=interaction.interaction_id,
        status=interaction.status,  # type: ignore[arg-type]
        version=interaction.version,
    )


class RoutingServicer(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self, router: Router, bus: OfferBus) -> None:
        self._router = router
        self._bus = bus

    def CreateInteraction(
        self, request: pb.CreateInteractionRequest, context: grpc.ServicerContext
    ) -> pb.CreateInteractionResponse:
        with domain_errors_as_status(context):
            interaction = self._router.create(to_create_command(request), request.correlation_id)
            return pb.CreateInteractionResponse(
                interaction_id=interaction.interaction_id, queue_id=interaction.queue_id
            )

    def Abandon(self, request: pb.InteractionRef, context: grpc.ServicerContext) -> pb.InteractionResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            return to_response(self._router.abandon(request.interaction_id, request.reason, meta))

    def Cancel(self, request: pb.InteractionRef, context: grpc.ServicerContext) -> pb.InteractionResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            return to_response(self._router.cancel(request.interaction_id, request.reason, meta))

    def StreamOffers(self, request: pb.StreamOffersRequest, context: grpc.ServicerContext) -> Iterator[pb.Offer]:
        if not request.agent_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent_id: is required")
        stream = self._bus.subscribe(request.agent_id)
        context.add_callback(lambda: self._bus.unsubscribe(request.agent_id, stream))
        context.send_initial_metadata((("subscribed", request.agent_id),))
        yield from self._router.standing_offers(request.agent_id)  # e.g. after a desktop reconnects
        while context.is_active():
            try:
                yield stream.get(timeout=0.5)
            except queue.Empty:
                continue

    def AcceptOffer(self, request: pb.OfferDecision, context: grpc.ServicerContext) -> pb.InteractionResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            return to_response(self._router.accept(request.agent_id, request.interaction_id, meta))

    def RejectOffer(self, request: pb.OfferDecision, context: grpc.ServicerContext) -> pb.InteractionResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            return to_response(self._router.reject(request.agent_id, request.interaction_id, meta))

    def EndInteraction(self, request: pb.OfferDecision, context: grpc.ServicerContext) -> pb.InteractionResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            return to_response(self._router.end(request.agent_id, request.interaction_id, meta))

    def CompleteInteraction(
        self, request: pb.CompleteInteractionRequest, context: grpc.ServicerContext
    ) -> pb.InteractionResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            interaction = self._router.complete(
                request.agent_id, request.interaction_id, request.wrap_up_code, request.disposition, meta
            )
            return to_response(interaction)

    def Transfer(self, request: pb.TransferRequest, context: grpc.ServicerContext) -> pb.InteractionResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            interaction = self._router.transfer(
                request.agent_id, request.interaction_id, request.to_queue_id, request.to_agent_id, request.warm, meta
            )
            return to_response(interaction)

    def Escalate(self, request: pb.EscalateRequest, context: grpc.ServicerContext) -> pb.InteractionResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            interaction = self._router.escalate(
                request.agent_id, request.interaction_id, request.to_team_leader, request.reason, meta
            )
            return to_response(interaction)

    def GetQueueStats(self, request: pb.GetQueueStatsRequest, context: grpc.ServicerContext) -> pb.QueueStats:
        with domain_errors_as_status(context):
            return self._stats(request.queue_id)

    def ListQueueStats(
        self, request: pb.ListQueueStatsRequest, context: grpc.ServicerContext
    ) -> pb.ListQueueStatsResponse:
        return pb.ListQueueStatsResponse(queues=[self._stats(q) for q in self._router.queue_ids()])

    def WatchQueues(
        self, request: pb.WatchQueuesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListQueueStatsResponse]:
        interval = request.interval_s if request.interval_s > 0 else 1.0
        while context.is_active():
            yield pb.ListQueueStatsResponse(queues=[self._stats(q) for q in self._router.queue_ids()])
            time.sleep(max(interval, 0.1))

    def _stats(self, queue_id: str) -> pb.QueueStats:
        queue_config, kpis, since, ready, busy = self._router.queue_stats(queue_id)
        stats = pb.QueueStats(
            queue_id=queue_id,
            waiting=kpis.waiting,
            longest_wait_s=kpis.longest_wait_s,
            agents_ready=ready,
            agents_busy=busy,
            service_level=kpis.service_level,
            service_level_target=queue_config.sla_target,
            service_level_threshold_s=queue_config.sla_threshold_s,
            average_speed_of_answer_s=kpis.average_speed_of_answer_s,
            abandonment_rate=kpis.abandonment_rate,
            offered=kpis.offered,
            answered=kpis.answered,
            abandoned=kpis.abandoned,
            service_level_variant=self._router.sl_variant,
        )
        stats.counted_since.FromDatetime(since)
        return stats
