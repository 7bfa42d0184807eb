"""`make run`: a short contact-center morning on the real stack.

Starts the agents service, its projection worker and the routing service, sets
up a team (within the 10-16 span of control) and logs the agents in.  Customers
then arrive on voice, chat and email in Italian, Polish and English; the router
offers each one to a qualified agent, whose desktop (a small bot here) accepts,
talks, wraps up.  One agent rejects an offer, a caller hangs up while waiting,
one call is transferred and one escalated to the team leader.  A team leader's
WatchTeam stream prints agent changes as they happen; at the end the queues'
KPIs and the team's statistics are shown.  Each run uses its own namespace, so
it starts from a clean day.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import grpc
from centralino.v1 import agents_pb2 as apb
from centralino.v1 import agents_pb2 as pb
from centralino.v1 import agents_pb2_grpc, routing_pb2_grpc
from centralino.v1 import routing_pb2 as rpb
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
    ("luca.ferrari", "Luca Ferrari", pb.CONSULTANT, [("customer_service", 4), ("sales", 4), ("lang:it", 5)]),
    ("sara.conti", "Sara Conti", pb.EXPERT, [("account_management", 5), ("lang:it", 5), ("lang:en", 5)]),
    ("tomasz.wojcik", "Tomasz Wójcik", pb.CONSULTANT, [("technical_support", 3), ("lang:pl", 5)]),
    ("chiara.romano", "Chiara Romano", pb.JUNIOR_CONSULTANT, [("customer_service", 2), ("lang:it", 5)]),
    ("pawel.lewandowski", "Paweł Lewandowski", pb.SENIOR_CONSULTANT, [("sales", 4), ("lang:pl", 5)]),
    ("marco.greco", "Marco Greco", pb.SPECIALIST, [("social_media", 5), ("lang:it", 5)]),
    ("agnieszka.zielinska", "Agnieszka Zielińska", pb.CONSULTANT, [("customer_service", 3), ("lang:pl", 5)]),
    ("tl.moretti", "Francesca Moretti", pb.EXPERT, [("customer_service", 5), ("escalation", 5), ("lang:it", 5)]),
]
TEAM_LEADER = "tl.moretti"
CHANNELS = [
    pb.ChannelCapacity(channel=pb.VOICE, max_concurrent=1),
    pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=3),
    pb.ChannelCapacity(channel=pb.EMAIL, max_concurrent=5),
    pb.ChannelCapacity(channel=pb.SOCIAL, max_concurrent=5),
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
        lead = pb.AssignTeamLeaderRequest(team_id=TEAM_ID, team_leader_id=TEAM_LEADER)
        team = self.stub.AssignTeamLeader(lead, timeout=10)
        self.console.print(f"team [bold]{TEAM_ID}[/]: {team.members} agents, team leader {TEAM_LEADER}")
        try:  # bad input gets a clear status naming the field at fault
            self.change("anna.rossi", T.GO_NOT_READY, reason=pb.MISSED_OFFER)
        except grpc.RpcError as error:
            self.console.print(f"refused as it should be: [yellow]{error.code().name}[/] {error.details()}")

    def log_in_everyone(self) -> None:
        for agent_id, *_ in PEOPLE:
            self.change(agent_id, T.LOG_IN)
            self.change(agent_id, T.GO_READY)
        self.change("giulia.bianchi", T.GO_NOT_READY, reason=pb.TRAINING)


class Desk:
    """An agent's desktop: takes offers from the router and works them like a person would (faster)."""

    def __init__(self, routing: routing_pb2_grpc.RoutingServiceStub, agent_id: str, console: Console) -> None:
        self.routing = routing
        self.agent_id = agent_id
        self.console = console
        self.seen: set[tuple[str, int]] = set()  # offers arrive at least once: dedupe by offer
        self.stream = routing.StreamOffers(rpb.StreamOffersRequest(agent_id=agent_id))
        self.stream.initial_metadata()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for offer in self.stream:
                key = (offer.interaction_id, offer.expires_at.ToNanoseconds())
                if key not in self.seen:
                    self.seen.add(key)
                    threading.Thread(target=self.work, args=(offer,), daemon=True).start()
        except grpc.RpcError:
            pass  # closed at the end of the run

    def decision(self, offer: rpb.Offer) -> rpb.OfferDecision:
        return rpb.OfferDecision(agent_id=self.agent_id, interaction_id=offer.interaction_id)

    def work(self, offer: rpb.Offer) -> None:
        try:
            self._work(offer)
        except grpc.RpcError as error:
            self.console.print(f"  [red]refused[/] {self.agent_id}: {error.code().name} {error.details()}")

    def _work(self, offer: rpb.Offer) -> None:
        who = f"{self.agent_id:<20}"
        if offer.attributes.get("reject_by") == self.agent_id:
            self.routing.RejectOffer(self.decision(offer))
            self.console.print(f"  [red]reject[/] {who} {offer.queue_id}: busy with a colleague's question")
            return
        self.routing.AcceptOffer(self.decision(offer))
        channel = apb.Channel.Name(offer.channel).lower()
        self.console.print(f"  [green]answer[/] {who} {channel:<5} {offer.queue_id:<24} {offer.customer_id}")
        time.sleep(0.3 + 0.1 * (hash(offer.interaction_id) % 5))
        if offer.attributes.get("transfer_to") not in (None, offer.queue_id):
            to_queue = offer.attributes["transfer_to"]
            self.routing.Transfer(
                rpb.TransferRequest(agent_id=self.agent_id, interaction_id=offer.interaction_id, to_queue_id=to_queue)
            )
            self.console.print(f"  [cyan]transfer[/] {who} -> {to_queue}")
        elif offer.attributes.get("escalate") and self.agent_id != TEAM_LEADER:
            escalate = rpb.EscalateRequest(
                agent_id=self.agent_id, interaction_id=offer.interaction_id, to_team_leader=True
            )
            self.routing.Escalate(escalate)
            self.console.print(f"  [magenta]escalate[/] {who} -> team leader")
        else:
            self.routing.EndInteraction(self.decision(offer))
        time.sleep(0.2)
        complete = rpb.CompleteInteractionRequest(
            agent_id=self.agent_id, interaction_id=offer.interaction_id, wrap_up_code="resolved", disposition="resolved"
        )
        self.routing.CompleteInteraction(complete)

    def close(self) -> None:
        self.stream.cancel()


CUSTOMERS = [
    ("customer_service", "it", apb.VOICE, "+39 02 5550101", {}),
    ("technical_support", "pl", apb.CHAT, "jan@example.pl", {}),
    ("sales", "it", apb.CHAT, "@mario_social", {}),
    ("customer_service", "it", apb.EMAIL, "lucia@example.it", {}),
    ("technical_support", "pl", apb.VOICE, "+48 22 5550102", {"transfer_to": "sales.pl"}),
    ("account_management", "en", apb.VOICE, "+44 20 5550103", {}),
    ("customer_service", "it", apb.CHAT, "paolo@example.it", {"escalate": "yes"}),
    ("social_media", "it", apb.SOCIAL, "@angry_customer", {}),
    ("customer_service", "it", apb.CHAT, "anna.b@example.it", {"reject_by": "luca.ferrari"}),
    ("sales", "pl", apb.EMAIL, "ola@example.pl", {}),
]


def customers_arrive(routing: routing_pb2_grpc.RoutingServiceStub, console: Console) -> list[str]:
    ids = []
    for department, language, channel, customer, attributes in CUSTOMERS:
        request = rpb.CreateInteractionRequest(
            channel=channel,
            direction=rpb.INBOUND,
            customer_id=customer,
            language=language,
            department=department,
            attributes=attributes,
        )
        ids.append(routing.CreateInteraction(request, timeout=10).interaction_id)
        time.sleep(0.15)
    # A caller in a queue nobody serves right now hangs up after a while.
    lost = routing.CreateInteraction(
        rpb.CreateInteractionRequest(
            channel=apb.VOICE, direction=rpb.INBOUND, customer_id="+39 06 5550199", language="it", department="fraud"
        ),
        timeout=10,
    )
    time.sleep(6.0)  # longer than the 5 s short-abandon threshold, so it counts
    routing.Abandon(rpb.InteractionRef(interaction_id=lost.interaction_id, reason="caller hung up"))
    console.print("  [yellow]abandon[/] a caller to fraud.it hung up after 6 s (nobody was free)")
    return ids


def wait_until_done(routing: routing_pb2_grpc.RoutingServiceStub, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queues = routing.ListQueueStats(rpb.ListQueueStatsRequest(), timeout=10).queues
        if all(q.waiting == 0 for q in queues):
            time.sleep(1.5)  # let the last wrap-ups finish
            return
        time.sleep(0.3)


def show_queues(routing: routing_pb2_grpc.RoutingServiceStub, console: Console) -> None:
    table = Table(title="queues (routing service)")
    for column in ("queue", "offered", "answered", "abandoned", "SL", "ASA s", "abandon %"):
        table.add_column(column)
    for q in routing.ListQueueStats(rpb.ListQueueStatsRequest(), timeout=10).queues:
        if q.offered:
            table.add_row(
                q.queue_id,
                str(q.offered),
                str(q.answered),
                str(q.abandoned),
                f"{q.service_level:.0%}",
                f"{q.average_speed_of_answer_s:.2f}",
                f"{q.abandonment_rate:.0%}",
            )
    console.print(table)


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
    processes = [
        ServiceProcess("services.agents.server", env, logs / "agents-server.log").start(),
        ServiceProcess("services.agents.worker", env, logs / "agents-worker.log").start(),
        ServiceProcess("services.routing.server", env, logs / "routing-server.log").start(),
    ]
    stop = threading.Event()
    desks: list[Desk] = []
    try:
        processes[0].wait_healthy(settings.grpc_target("agents"))
        processes[1].wait_log("[^Worker]: Ready")
        processes[2].wait_healthy(settings.grpc_target("routing"))
        console.print(f"namespace {namespace}; logs in {logs.resolve()}")
        with (
            grpc.insecure_channel(settings.grpc_target("agents")) as a,
            grpc.insecure_channel(settings.grpc_target("routing")) as r,
        ):
            stub, routing = agents_pb2_grpc.AgentsServiceStub(a), routing_pb2_grpc.RoutingServiceStub(r)
            morning = Morning(stub, console)
            morning.set_up_team()
            watcher = watch(stub, console, stop)
            morning.log_in_everyone()
            desks = [Desk(routing, agent_id, console) for agent_id, *_ in PEOPLE]
            customers_arrive(routing, console)
            wait_until_done(routing)
            show_queues(routing, console)
            time.sleep(1.0)  # the read model trails the last wrap-ups by a moment
            show(stub, console, {})
            stop.set()
            watcher.join(timeout=5)
    finally:
        stop.set()
        for desk in desks:
            desk.close()
        for process in processes:
            process.stop()


if __name__ == "__main__":
    main()
