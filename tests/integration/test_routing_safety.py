"""Never double-booked: many concurrent interactions, answering bots, a router killed mid-flight.

Afterwards the logs themselves are the evidence: every agent's state history
(folded with the agents domain) never exceeds capacity, every interaction was
offered to one agent at a time, and every accepted interaction was completed.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from centralino.v1 import agents_pb2 as apb
from centralino.v1 import routing_pb2 as pb
from centralino.v1.agents_pb2 import Transition as T

from services.agents import domain as agents_domain
from services.agents.events import REGISTRY as AGENT_EVENTS
from services.routing.checkpoints import load_checkpoint
from services.routing.events import REGISTRY as ROUTING_EVENTS
from tests.helpers import event_log, eventually
from tests.integration.conftest import Platform

pytestmark = pytest.mark.integration
INTERACTIONS = 60
AGENTS = 6


class Bot:
    """An agent who accepts every offer, talks briefly, wraps up; reconnects when the router restarts."""

    def __init__(self, platform: Platform, agent_id: str) -> None:
        self.platform = platform
        self.agent_id = agent_id
        self.handled: set[str] = set()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while not self.stop.is_set():
            try:
                stream = self.platform.routing.StreamOffers(pb.StreamOffersRequest(agent_id=self.agent_id))
                for offer in stream:
                    if self.stop.is_set():
                        stream.cancel()
                        return
                    if offer.interaction_id not in self.handled:
                        self.handled.add(offer.interaction_id)
                        self.pool.submit(self._work, offer.interaction_id)
            except grpc.RpcError:
                time.sleep(0.2)  # the router is restarting

    def _call(self, method: str, request: object) -> bool:
        for _ in range(50):
            try:
                getattr(self.platform.routing, method)(request, timeout=5)
                return True
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return False  # already done (a retry after a restart) or no longer ours
                time.sleep(0.2)
        return False

    def _work(self, iid: str) -> None:
        decision = pb.OfferDecision(agent_id=self.agent_id, interaction_id=iid)
        if not self._call("AcceptOffer", decision):
            self.handled.discard(iid)
            return
        time.sleep(random.uniform(0.05, 0.3))
        self._call("EndInteraction", decision)
        complete = pb.CompleteInteractionRequest(agent_id=self.agent_id, interaction_id=iid, wrap_up_code="ok")
        self._call("CompleteInteraction", complete)


def test_no_double_booking_under_load_and_a_router_crash(platform: Platform) -> None:
    platform.agents.CreateTeam(apb.CreateTeamRequest(team_id="s-team", name="Safety team"))
    agents = [f"bot-{n}" for n in range(AGENTS)]
    for n, agent_id in enumerate(agents):
        platform.agents.RegisterAgent(
            apb.RegisterAgentRequest(
                agent_id=agent_id,
                name="Bot",
                team_id="s-team",
                seniority=apb.CONSULTANT,
                skills=[apb.Skill(name="sales", proficiency=1 + n % 5), apb.Skill(name="lang:it", proficiency=5)],
                channels=[
                    apb.ChannelCapacity(channel=apb.VOICE, max_concurrent=1),
                    apb.ChannelCapacity(channel=apb.CHAT, max_concurrent=3),
                ],
            )
        )
        platform.agents.ChangeState(apb.ChangeStateRequest(agent_id=agent_id, transition=T.LOG_IN))
        platform.agents.ChangeState(apb.ChangeStateRequest(agent_id=agent_id, transition=T.GO_READY))
    bots = [Bot(platform, agent_id) for agent_id in agents]
    ids = [f"load-{uuid.uuid4().hex[:10]}" for _ in range(INTERACTIONS)]

    def create(iid: str) -> None:
        channel = apb.VOICE if hash(iid) % 4 == 0 else apb.CHAT
        request = pb.CreateInteractionRequest(
            interaction_id=iid,  # a retry after the crash is idempotent
            channel=channel,
            direction=pb.INBOUND,
            customer_id=f"{iid}@example.com",
            language="it",
            department="sales",
            priority=hash(iid) % 3,
        )
        for _ in range(100):
            try:
                platform.routing.CreateInteraction(request, timeout=5)
                return
            except grpc.RpcError:
                time.sleep(0.2)
        raise AssertionError(f"could not create {iid}")

    try:
        with ThreadPoolExecutor(max_workers=6) as creators:
            first = list(creators.map(create, ids[: INTERACTIONS // 2]))
            # The restart begins from a checkpoint taken while offers and calls are in progress.
            routing_log = platform.settings.topic("routing")
            eventually(lambda: load_checkpoint(routing_log) is not None, timeout_s=10, interval_s=0.05)
            time.sleep(0.3)  # and the log goes on after it: accepts, ends, completions
            platform.restart_router(kill=True)  # SIGKILL mid-flight: offers and calls in progress
            second = list(creators.map(create, ids[INTERACTIONS // 2 :]))
        assert len(first) + len(second) == INTERACTIONS

        def stuck() -> dict[str, list[str]]:
            logs = {iid: [kind.removeprefix("routing.") for kind, _ in event_log(iid, ROUTING_EVENTS)] for iid in ids}
            return {iid: kinds for iid, kinds in logs.items() if kinds[-1] != "InteractionCompleted"}

        try:
            eventually(lambda: not stuck(), timeout_s=120, interval_s=1.0)
        except AssertionError:  # say which interactions, and how far each got, for whoever reads CI
            left = stuck()
            handled = {bot.agent_id: sorted(bot.handled & set(left)) for bot in bots}
            steps = {a: [e for kind, e in event_log(a, AGENT_EVENTS) if kind.endswith("StateChanged")] for a in agents}
            last_steps = {a: [T.Name(e.transition) for e in changes[-3:]] for a, changes in steps.items()}
            raise AssertionError(
                f"{len(left)} interactions never completed: {left}; the bots holding them: "
                f"{ {agent: iids for agent, iids in handled.items() if iids} }; agents' last steps: {last_steps}"
            ) from None
    finally:
        for bot in bots:
            bot.stop.set()

    # Every interaction: offered to one agent at a time, accepted exactly once, completed.
    for iid in ids:
        kinds = [kind.split(".")[1] for kind, _ in event_log(iid, ROUTING_EVENTS)]
        offered = False
        for kind in kinds:
            if kind == "InteractionOffered":
                assert not offered, f"{iid} offered twice at once: {kinds}"
                offered = True
            elif kind in ("OfferEnded", "OfferAccepted"):
                offered = False
        assert Counter(kinds)["OfferAccepted"] == 1 and kinds[-1] == "InteractionCompleted", kinds

    # Agents follow their interactions once each step is durable: wait until all have caught up.
    def agents_done() -> bool:
        return all(agents_domain.replay(a, [e for _, e in event_log(a, AGENT_EVENTS)]).work == () for a in agents)

    eventually(agents_done, timeout_s=30, interval_s=0.5)

    # Every agent: replaying its history never exceeds a channel's capacity or mixes voice with chats.
    connected_by: Counter[str] = Counter()
    for agent_id in agents:
        agent = agents_domain.Agent(agent_id=agent_id)
        for _, event in event_log(agent_id, AGENT_EVENTS):
            agent = agents_domain.apply(agent, event)  # type: ignore[arg-type]
            per_channel = Counter(w.channel for w in agent.work)
            assert per_channel[apb.VOICE] <= 1 and per_channel[apb.CHAT] <= 3, agent.work
            assert not (per_channel[apb.VOICE] and per_channel[apb.CHAT]), agent.work
            if getattr(event, "transition", None) == T.CONNECT:
                connected_by[event.interaction_id] += 1  # type: ignore[attr-defined]
        assert agent.work == ()  # nothing left half-done
    assert all(connected_by[iid] == 1 for iid in ids), connected_by
