"""Routing drives agents' states through the agents service (it owns capacity rules)."""

from __future__ import annotations

import grpc
from centralino.v1 import agents_pb2, agents_pb2_grpc
from centralino.v1.agents_pb2 import Transition

REFUSALS = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


class AgentRefused(Exception):
    """The agents service refused the change (agent not ready, at capacity, unknown, ...)."""


class AgentsPort:
    def __init__(self, channel: grpc.Channel, timeout_s: float = 5.0) -> None:
        self._stub = agents_pb2_grpc.AgentsServiceStub(channel)
        self._timeout_s = timeout_s

    def change(
        self, agent_id: str, transition: int, interaction_id: str, channel: int = 0, wrap_up_code: str = ""
    ) -> agents_pb2.ChangeStateResponse:
        """The agents service stamps the time: its own ordering check then never races ours."""
        request = agents_pb2.ChangeStateRequest(
            agent_id=agent_id,
            transition=transition,  # type: ignore[arg-type]
            interaction_id=interaction_id,
            channel=channel,  # type: ignore[arg-type]
            wrap_up_code=wrap_up_code,
            correlation_id=interaction_id,
        )
        try:
            return self._stub.ChangeState(request, timeout=self._timeout_s)
        except grpc.RpcError as error:
            if error.code() in REFUSALS:
                raise AgentRefused(error.details()) from error
            raise

    def reserve(self, agent_id: str, interaction_id: str, channel: int) -> None:
        self.change(agent_id, Transition.RESERVE, interaction_id, channel=channel)
