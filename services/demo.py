"""`make run`: starts the agents service and its projection, runs a small contact-center
flow through them and shows the resulting read model.  Later issues grow this into a
whole contact-center day.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from centralino.v1 import agents_pb2 as pb
from centralino.v1 import agents_pb2_grpc
from rich.console import Console
from rich.table import Table

from services.kernel.config import load_settings
from services.kernel.runner import ServiceProcess

TEAM = [
    ("anna.rossi", "Anna Rossi", pb.SENIOR_CONSULTANT, [("customer_service", 5), ("lang:it", 5), ("lang:en", 4)]),
    ("marek.nowak", "Marek Nowak", pb.CONSULTANT, [("technical_support", 4), ("lang:pl", 5), ("lang:en", 3)]),
    ("giulia.bianchi", "Giulia Bianchi", pb.JUNIOR_CONSULTANT, [("sales", 3), ("lang:it", 5)]),
    ("ewa.kowalska", "Ewa Kowalska", pb.SPECIALIST, [("fraud", 5), ("escalation", 4), ("lang:pl", 5)]),
]
CHANNELS = [
    pb.ChannelCapacity(channel=pb.VOICE, max_concurrent=1),
    pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=3),
]


def register_team(stub: agents_pb2_grpc.AgentsServiceStub, console: Console) -> None:
    for agent_id, name, seniority, skills in TEAM:
        request = pb.RegisterAgentRequest(
            agent_id=agent_id,
            name=name,
            team_id="team-milano-1",
            seniority=seniority,
            skills=[pb.Skill(name=s, proficiency=p) for s, p in skills],
            channels=CHANNELS,
        )
        try:
            reply = stub.RegisterAgent(request, timeout=10)
            console.print(f"registered [bold]{agent_id}[/] -> event {reply.event_id} (version {reply.version})")
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            console.print(f"{agent_id} was registered by an earlier run")
    # Show what bad input gets: a clear status naming the field.
    try:
        stub.RegisterAgent(pb.RegisterAgentRequest(agent_id="bad id!", name="x"), timeout=10)
    except grpc.RpcError as error:
        console.print(f"bad input refused: [yellow]{error.code().name}[/] {error.details()}")


def wait_for_projection(stub: agents_pb2_grpc.AgentsServiceStub, timeout_s: float = 60) -> list[pb.AgentView]:
    deadline = time.monotonic() + timeout_s
    views: list[pb.AgentView] = []
    for agent_id, *_ in TEAM:
        while True:
            try:
                views.append(stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id), timeout=5))
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    return views


def show(views: list[pb.AgentView], console: Console) -> None:
    table = Table(title="agents_view (MongoDB read model, projected by Faust from Kafka)")
    for column in ("agent", "name", "team", "seniority", "skills", "version"):
        table.add_column(column)
    for view in views:
        skills = ", ".join(f"{s.name}:{s.proficiency}" for s in view.skills)
        table.add_row(
            view.agent_id, view.name, view.team_id, pb.Seniority.Name(view.seniority), skills, str(view.version)
        )
    console.print(table)


def main() -> None:
    console = Console()
    settings = load_settings()
    logs = settings.state_dir / "logs"
    server = ServiceProcess("services.agents.server", {}, logs / "agents-server.log").start()
    worker = ServiceProcess("services.agents.worker", {}, logs / "agents-worker.log").start()
    try:
        target = settings.grpc_target("agents")
        server.wait_healthy(target)
        worker.wait_log("[^Worker]: Ready")
        console.print(f"agents service healthy on {target}; logs in {Path(logs).resolve()}")
        with grpc.insecure_channel(target) as channel:
            stub = agents_pb2_grpc.AgentsServiceStub(channel)
            started = time.monotonic()
            register_team(stub, console)
            views = wait_for_projection(stub)
            console.print(f"command -> Kafka -> Faust -> MongoDB in {time.monotonic() - started:.2f}s")
            show(views, console)
    finally:
        server.stop()
        worker.stop()


if __name__ == "__main__":
    main()
