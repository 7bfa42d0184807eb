"""Thin gRPC servicer: protobuf <-> primitives, domain errors <-> status codes."""

from __future__ import annotations

from typing import cast

import grpc
from centralino.v1 import agents_pb2, agents_pb2_grpc

from services.agents.adapters import AgentDocument
from services.agents.application import AgentsApplication
from services.agents.domain import RegisterAgent
from services.kernel.envelope import Metadata, new_id
from services.kernel.grpc_server import domain_errors_as_status

PRODUCER = "centralino-agents"


def metadata_for(correlation_id: str) -> Metadata:
    # Each request is one command: its id is the causation of the events it produces.
    return Metadata(correlation_id=correlation_id or new_id(), causation_id=new_id(), producer=PRODUCER)


def to_register_command(request: agents_pb2.RegisterAgentRequest) -> RegisterAgent:
    return RegisterAgent(
        agent_id=request.agent_id,
        name=request.name,
        team_id=request.team_id,
        seniority=request.seniority,
        skills=tuple((s.name, s.proficiency) for s in request.skills),
        channels=tuple((c.channel, c.max_concurrent) for c in request.channels),
    )


def to_view(document: AgentDocument) -> agents_pb2.AgentView:
    view = agents_pb2.AgentView(
        agent_id=document.agent_id,
        name=document.name or "",
        team_id=document.team_id or "",
        seniority=cast(agents_pb2.Seniority, document.seniority or 0),
        skills=[agents_pb2.Skill(name=s.name, proficiency=s.proficiency) for s in document.skills],
        channels=[
            agents_pb2.ChannelCapacity(channel=c.channel, max_concurrent=c.max_concurrent) for c in document.channels
        ],
        version=document.version,
    )
    if document.registered_at:
        view.registered_at.FromDatetime(document.registered_at)
    return view


class AgentsServicer(agents_pb2_grpc.AgentsServiceServicer):
    def __init__(self, application: AgentsApplication) -> None:
        self._app = application

    def RegisterAgent(  # noqa: N802 (gRPC method names are fixed by the proto)
        self, request: agents_pb2.RegisterAgentRequest, context: grpc.ServicerContext
    ) -> agents_pb2.RegisterAgentResponse:
        with domain_errors_as_status(context):
            envelopes = self._app.register_agent(to_register_command(request), metadata_for(request.correlation_id))
            last = envelopes[-1]
            return agents_pb2.RegisterAgentResponse(
                agent_id=last.aggregate_id, version=last.sequence, event_id=last.event_id
            )

    def GetAgent(  # noqa: N802
        self, request: agents_pb2.GetAgentRequest, context: grpc.ServicerContext
    ) -> agents_pb2.AgentView:
        with domain_errors_as_status(context):
            return to_view(self._app.get_agent(request.agent_id))
