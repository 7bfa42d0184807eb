"""`make run`: a short contact-center morning on the real stack.

Starts the agents service and its projection worker, sets up a team (within the
10-16 span of control), logs the agents in, plays a few calls and chats through
the agent state machine while a team leader's WatchTeam stream prints every
change, then shows the team's live statistics from the read model.  Each run uses
its own namespace, so it starts from a clean day; later issues grow this into the
whole contact-center day (routing, CRM, loyalty, training).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import grpc
from centralino.v1 import agents_pb2 as pb
from centralino.v1 import agents_pb2_grpc
from centralino.v1.agents_pb2 import Transition as T
from rich.console import Console
from rich.table import Table

from services.kernel.config import load_settings
from services.kernel.runner import ServiceProcess

TEAM_ID = "milano-1"
PEOPLE = [
    ("anna.rossi", "Anna Rossi", pb.SENIOR_CONSULTANT, [("customer_service", 5), ("lang:it", 5), ("lang:en", 4)]),
    ("marek.nowak", "Marek Nowak", pb.CONSULTANT, [("technical_support", 4), ("lang:pl", 5), ("lang:en", 3)]),
    ("giulia.bianchi", "Giulia Bianchi", pb.JUNIOR_CONSULTANT, [("sales", 3), ("lang:it", 5)]),
    ("ewa.kowalska", "Ewa Kowalska", pb.SPECIALIST, [("fraud", 5), ("escalation", 4), ("lang:pl", 5)]),
    ("luca.ferrari", "Luca Ferrari", pb.CONSULTANT, [("customer_service", 4), ("lang:it", 5)]),
    ("sara.conti", "Sara Conti", pb.EXPERT, [("account_management", 5), ("lang:it", 5), ("lang:en", 5)]),
    ("tomasz.wojcik", "Tomasz Wójcik", pb.CONSULTANT, [("technical_support", 3), ("lang:pl", 5)]),
    ("chiara.romano", "Chiara Romano", pb.JUNIOR_CONSULTANT, [("customer_service", 2), ("lang:it", 5)]),
    ("pawel.lewandowski", "Paweł Lewandowski", pb.SENIOR_CONSULTANT, [("sales", 4), ("lang:pl", 5)]),
    ("marco.greco", "Marco Greco", pb.SPECIALIST, [("social_media", 5), ("lang:it", 5)]),
    ("agnieszka.zielinska", "Agnieszka Zielińska", pb.CONSULTANT, [("customer_service", 3), ("lang:pl", 5)]),
]
CHANNELS = [
    pb.ChannelCapacity(channel=pb.VOICE, max_concurrent=1),
    pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=3),
    pb.ChannelCapacity(channel=pb.EMAIL, max_concurrent=5),
]


class Morning:
    def __init__(self, stub: agents_pb2_grpc.AgentsServiceStub, console: Console) -> None:
        self.stub = stub
        self.console = console
        self.versions: dict[str, int] = {}  # the last version each agent's commands produced

    def change(self, agent_id: str, transition: int, **fields: Any) -> pb.ChangeStateResponse:
        request = pb.ChangeStateRequest(agent_id=agent_id, transition=transition, **fields)  # type: ignore[arg-type]
        reply = self.stub.ChangeState(request, timeout=10)
        self.versions[agent_id] = reply.version
        return reply

    def set_up_team(self) -> None:
        self.stub.CreateTeam(pb.CreateTeamRequest(team_id=TEAM_ID, name="Milano inbound", supervisor_id="sup.esposito"))
        for agent_id, name, seniority, skills in PEOPLE:
            self.stub.RegisterAgent(
                pb.RegisterAgentRequest(
                    agent_id=agent_id,
                    name=name,
                    team_id=TEAM_ID,
                    seniority=seniority,
                    skills=[pb.Skill(name=s, proficiency=p) for s, p in skills],
                    channels=CHANNELS,
                ),
                timeout=10,
            )
        lead = pb.AssignTeamLeaderRequest(team_id=TEAM_ID, team_leader_id="tl.moretti")
        team = self.stub.AssignTeamLeader(lead, timeout=10)
        self.console.print(f"team [bold]{TEAM_ID}[/]: {team.members} agents, team leader tl.moretti")
        try:  # bad input gets a clear status naming the field at fault
            self.change("anna.rossi", T.GO_NOT_READY, reason=pb.MISSED_OFFER)
        except grpc.RpcError as error:
            self.console.print(f"refused as it should be: [yellow]{error.code().name}[/] {error.details()}")

    def play(self) -> None:
        for agent_id, *_ in PEOPLE:
            self.change(agent_id, T.LOG_IN)
            self.change(agent_id, T.GO_READY)
        self.change("giulia.bianchi", T.GO_NOT_READY, reason=pb.TRAINING)
        self.call("anna.rossi", "call-0001", hold=True)
        for n in range(3):
            self.change("marco.greco", T.RESERVE, interaction_id=f"chat-{n}", channel=pb.CHAT)
            self.change("marco.greco", T.CONNECT, interaction_id=f"chat-{n}")
        self.call("marek.nowak", "call-0002", hold=False)
        self.change("ewa.kowalska", T.RESERVE, interaction_id="call-0003", channel=pb.VOICE)
        self.change("ewa.kowalska", T.MISS_OFFER, interaction_id="call-0003")  # offer timed out
        try:
            self.change("marco.greco", T.RESERVE, interaction_id="call-0004", channel=pb.VOICE)
        except grpc.RpcError as error:
            self.console.print(f"refused as it should be: [yellow]{error.code().name}[/] {error.details()}")

    def call(self, agent_id: str, interaction_id: str, hold: bool) -> None:
        self.change(agent_id, T.RESERVE, interaction_id=interaction_id, channel=pb.VOICE)
        self.change(agent_id, T.CONNECT, interaction_id=interaction_id)
        time.sleep(0.4)
        if hold:
            self.change(agent_id, T.HOLD, interaction_id=interaction_id)
            time.sleep(0.2)
            self.change(agent_id, T.RESUME, interaction_id=interaction_id)
        self.change(agent_id, T.END, interaction_id=interaction_id)
        time.sleep(0.2)
        self.change(agent_id, T.COMPLETE_WRAP_UP, interaction_id=interaction_id, wrap_up_code="resolved")


def watch(stub: agents_pb2_grpc.AgentsServiceStub, console: Console, stop: threading.Event) -> threading.Thread:
    stream = stub.WatchTeam(pb.WatchTeamRequest(team_id=TEAM_ID))
    stream.initial_metadata()  # subscribed: nothing from here on is missed

    def run() -> None:
        try:
            for change in stream:
                reason = f" ({pb.NotReadyReason.Name(change.reason)})" if change.reason else ""
                console.print(
                    f"  [dim]watch[/] {change.agent_id:<20} {pb.Transition.Name(change.transition):<17}"
                    f" -> {pb.AgentState.Name(change.state)}{reason}"
                )
        except grpc.RpcError:
            if not stop.is_set():
                raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    stop_watch = stream.cancel
    threading.Thread(target=lambda: (stop.wait(), stop_watch()), daemon=True).start()
    return thread


def show(stub: agents_pb2_grpc.AgentsServiceStub, console: Console, versions: dict[str, int]) -> None:
    """Wait until the read model has caught up with every command, then print it."""
    deadline = time.monotonic() + 60
    while True:
        stats = stub.GetTeamStats(pb.GetTeamStatsRequest(team_id=TEAM_ID), timeout=10)
        seen = {agent.agent_id: agent.version for agent in stats.agents}
        if all(seen.get(a, 0) >= v for a, v in versions.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    table = Table(title=f"team {TEAM_ID} (read model projected by Faust from Kafka)")
    for column in ("agent", "state", "since", "handled", "talk s", "hold s", "ACW s", "occupancy"):
        table.add_column(column)
    for agent in stats.agents:
        reason = f" {pb.NotReadyReason.Name(agent.reason)}" if agent.reason else ""
        since = agent.since.ToDatetime(tzinfo=UTC).strftime("%H:%M:%S")
        t = agent.today
        table.add_row(
            agent.agent_id,
            pb.AgentState.Name(agent.state) + reason,
            since,
            str(t.handled),
            f"{t.talk_s:.1f}",
            f"{t.hold_s:.1f}",
            f"{t.after_call_work_s:.1f}",
            f"{t.occupancy:.0%}",
        )
    console.print(table)
    by_state = ", ".join(f"{k}: {v}" for k, v in sorted(stats.agents_by_state.items()))
    console.print(
        f"{by_state} | handled {stats.handled} | AHT {stats.average_handle_time_s:.1f} s"
        f" | occupancy {stats.occupancy:.0%}"
    )


def main() -> None:
    console = Console()
    namespace = os.environ.get("CENTRALINO_NAMESPACE") or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    env = {"CENTRALINO_NAMESPACE": namespace}
    settings = load_settings({**os.environ, **env})
    logs = settings.state_dir / "logs"
    server = ServiceProcess("services.agents.server", env, logs / "agents-server.log").start()
    worker = ServiceProcess("services.agents.worker", env, logs / "agents-worker.log").start()
    stop = threading.Event()
    try:
        target = settings.grpc_target("agents")
        server.wait_healthy(target)
        worker.wait_log("[^Worker]: Ready")
        console.print(f"namespace {namespace}; agents service on {target}; logs in {logs.resolve()}")
        with grpc.insecure_channel(target) as channel:
            stub = agents_pb2_grpc.AgentsServiceStub(channel)
            morning = Morning(stub, console)
            morning.set_up_team()
            watcher = watch(stub, console, stop)
            morning.play()
            show(stub, console, morning.versions)
            stop.set()
            watcher.join(timeout=5)
    finally:
        stop.set()
        server.stop()
        worker.stop()


if __name__ == "__main__":
    main()
