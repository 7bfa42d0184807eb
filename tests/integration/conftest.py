"""The agents department running for real: gRPC server and Faust worker as subprocesses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1 import agents_pb2_grpc, routing_pb2_grpc

from infra.stack import free_port
from services.kernel import mongo as kernel_mongo
from services.kernel.config import Settings
from services.kernel.runner import ServiceProcess

WORKER_READY = "[^Worker]: Ready"


def namespace(stack: dict[str, str], state: Path) -> tuple[Settings, dict[str, str]]:
    """Settings of a fresh namespace (topics, consumer groups, database) and the
    environment that hands them to service processes."""
    settings = Settings(
        kafka_bootstrap=stack["kafka_bootstrap"],
        mongo_url=stack["mongo_url"],
        namespace=f"t{uuid.uuid4().hex[:12]}",
        state_dir=state,
        relay_interval_s=0.2,
    )
    env = {
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "MONGO_URL": settings.mongo_url,
        "CENTRALINO_NAMESPACE": settings.namespace,
        "CENTRALINO_STATE_DIR": str(state),
        "CENTRALINO_RELAY_INTERVAL_S": "0.2",
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(Path.cwd() / "gen")]),
    }
    return settings, env


@dataclass
class AgentsService:
    settings: Settings
    target: str
    stub: agents_pb2_grpc.AgentsServiceStub
    server: ServiceProcess
    worker: ServiceProcess
    env: dict[str, str]

    def register(self, agent_id: str, team_id: str = "team-1", **overrides: Any) -> pb.RegisterAgentResponse:
        fields: dict[str, Any] = {
            "agent_id": agent_id,
            "name": "Anna Rossi",
            "team_id": team_id,
            "seniority": pb.SENIOR_CONSULTANT,
            "skills": [pb.Skill(name="customer_service", proficiency=5), pb.Skill(name="lang:it", proficiency=5)],
            "channels": [pb.ChannelCapacity(channel=pb.VOICE, max_concurrent=1)],
        }
        fields.update(overrides)
        metadata = fields.pop("metadata", ())
        return self.stub.RegisterAgent(pb.RegisterAgentRequest(**fields), metadata=metadata, timeout=10)

    def create_team(self, team_id: str, **fields: Any) -> pb.TeamResponse:
        return self.stub.CreateTeam(pb.CreateTeamRequest(team_id=team_id, name=f"Team {team_id}", **fields), timeout=10)

    def change(self, agent_id: str, transition: int, **fields: Any) -> pb.ChangeStateResponse:
        request = pb.ChangeStateRequest(agent_id=agent_id, transition=transition, **fields)  # type: ignore[arg-type]
        return self.stub.ChangeState(request, timeout=10)

    def restart_worker(self, env: dict[str, str] | None = None) -> None:
        self.worker.stop()
        log = self.worker.log_path
        self.worker = ServiceProcess("services.agents.worker", {**self.env, **(env or {})}, log).start()
        self.worker.wait_log(WORKER_READY, offset=log.stat().st_size if log.exists() else 0)


@pytest.fixture(scope="module")
def agents(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentsService]:
    """One agents server and projection worker per test module, in a namespace of its own."""
    state = tmp_path_factory.mktemp("agents")
    settings, env = namespace(stack, state)
    port = free_port()
    env["AGENTS_GRPC_PORT"] = str(port)
    server = ServiceProcess("services.agents.server", env, state / "server.log").start()
    worker = ServiceProcess("services.agents.worker", env, state / "worker.log").start()
    client = kernel_mongo.connect(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    service = AgentsService(
        settings, f"127.0.0.1:{port}", agents_pb2_grpc.AgentsServiceStub(channel), server, worker, env
    )
    try:
        server.wait_healthy(service.target)
        worker.wait_log(WORKER_READY)
        yield service
    finally:
        channel.close()
        server.stop()
        service.worker.stop()
        kernel_mongo.drop_databases(client, settings)
        kernel_mongo.disconnect()


@dataclass
class Platform:
    """The agents server and the routing server (the router) on one namespace."""

    settings: Settings
    agents: agents_pb2_grpc.AgentsServiceStub
    routing: routing_pb2_grpc.RoutingServiceStub
    agents_server: ServiceProcess
    routing_server: ServiceProcess
    env: dict[str, str]
    routing_target: str

    def restart_router(self, kill: bool = False) -> None:
        self.routing_server.stop(sig=9 if kill else 15)
        log = self.routing_server.log_path
        self.routing_server = ServiceProcess("services.routing.server", self.env, log).start()
        self.routing_server.wait_healthy(self.routing_target)


@pytest.fixture(scope="module")
def platform(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    state = tmp_path_factory.mktemp("platform")
    settings, env = namespace(stack, state)
    agents_port, routing_port = free_port(), free_port()
    env["AGENTS_GRPC_PORT"] = str(agents_port)
    env["ROUTING_GRPC_PORT"] = str(routing_port)
    env["CENTRALINO_ROUTING_QUEUES"] = str(Path(__file__).parent / "routing_queues.json")
    # Checkpoints often, so that each restart of the router (a crash included) begins from one.
    env["CENTRALINO_ROUTING_CHECKPOINT_S"] = "0.5"
    agents_server = ServiceProcess("services.agents.server", env, state / "agents.log").start()
    routing_server = ServiceProcess("services.routing.server", env, state / "routing.log").start()
    client = kernel_mongo.connect(settings)
    agents_channel = grpc.insecure_channel(f"127.0.0.1:{agents_port}")
    routing_channel = grpc.insecure_channel(f"127.0.0.1:{routing_port}")
    running = Platform(
        settings,
        agents_pb2_grpc.AgentsServiceStub(agents_channel),
        routing_pb2_grpc.RoutingServiceStub(routing_channel),
        agents_server,
        routing_server,
        env,
        f"127.0.0.1:{routing_port}",
    )
    try:
        agents_server.wait_healthy(f"127.0.0.1:{agents_port}")
        routing_server.wait_healthy(running.routing_target)
        yield running
    finally:
        agents_channel.close()
        routing_channel.close()
        running.routing_server.stop()
        agents_server.stop()
        kernel_mongo.drop_databases(client, settings)
        kernel_mongo.disconnect()
