"""The router keeps the open interactions and a recent past, not every interaction ever:
queue figures are running tallies, and a request about a forgotten interaction is
answered from its history in the real event store.

The router runs in this process on a clock the test moves (no agents, so nothing is
offered and its routing thread is not needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from centralino.v1 import routing_pb2 as pb
from centralino.v1.agents_pb2 import CHAT

from services.agents import state_view
from services.kernel import eventstore
from services.kernel.config import Settings
from services.kernel.envelope import Metadata
from services.kernel.errors import PreconditionFailed
from services.kernel.repository import Repository
from services.routing.agent_feed import AgentFeed
from services.routing.agents_port import AgentsPort
from services.routing.checkpoints import drop_checkpoint, load_checkpoint, load_feed_checkpoint
from services.routing.domain.interaction import CreateInteraction, S
from services.routing.domain.queues import default_queues
from services.routing.events import INTERACTION, REGISTRY
from services.routing.offers import OfferBus
from services.routing.router import Router

pytestmark = pytest.mark.integration

ZONE = ZoneInfo("Europe/Rome")
RETENTION_S = 60.0
QUEUE = "customer_service.it"
META = Metadata(correlation_id="c-1", causation_id="cmd-1", producer="test")


class Clock:
    def __init__(self) -> None:
        self.at = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)  # 10:00 in Rome

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_router(mongo: Settings, clock: Clock) -> Iterator[Callable[[], Router]]:
    eventstore.ensure_indexes()
    topic = mongo.topic("routing")
    store = eventstore.EventStore(log_name=topic)
    channel = grpc.insecure_channel("127.0.0.1:9")  # the agents service: never called, nobody is ready

    def make() -> Router:
        return Router(
            Repository(store, REGISTRY, topic, INTERACTION),
            AgentsPort(channel),
            AgentFeed(mongo.kafka_bootstrap, mongo.topic("agents"), ZONE, lambda _: None),  # not started: no agents
            OfferBus(),
            default_queues(),
            clock,
            "answered_and_abandoned",
            topic,
            ZONE,
            RETENTION_S,
        )

    yield make
    channel.close()


def new(iid: str) -> CreateInteraction:
    return CreateInteraction(iid, CHAT, pb.INBOUND, "+39 333 1234567", "it", "customer_service")


def figures(router: Router) -> tuple[object, ...]:
    _, kpis, since, _, _ = router.queue_stats(QUEUE)
    return kpis.offered, kpis.answered, kpis.abandoned, kpis.waiting, kpis.service_level, since


def test_closed_interactions_are_forgotten_but_still_counted_and_answered_from_the_store(
    make_router: Callable[[], Router], clock: Clock
) -> None:
    router = make_router()
    for iid in ("gave-up", "withdrawn", "patient"):
        router.create(new(iid), "")
    clock.advance(30)
    router.abandon("gave-up", "hung up", META)  # 30 s: over the short-abandon threshold
    router.cancel("withdrawn", "campaign stopped", META)
    counted = figures(router)
    assert counted[:4] == (2, 0, 1, 1)  # the cancelled one was never offered to the queue

    clock.advance(RETENTION_S - 1)
    assert router.forget_closed() == 0
    clock.advance(2)
    assert router.forget_closed() == 2
    assert figures(router) == counted

    with pytest.raises(PreconditionFailed) as refused:  # from its history: still a clear refusal
        router.abandon("gave-up", "hung up again", META)
    assert refused.value.details == {"current-state": "ABANDONED"}
    retried = router.create(new("gave-up"), "")  # the client's late retry of the creation
    assert (retried.status, retried.version) == (S.ABANDONED, 2)
    assert figures(router) == counted  # not counted twice
    assert router.forget_closed() == 0

    restarted = make_router()
    assert restarted.recover() == 1  # only "patient" is open; the others are forgotten at once
    assert figures(restarted) == counted


def test_a_new_day_counts_from_its_midnight(make_router: Callable[[], Router], clock: Clock) -> None:
    router = make_router()
    router.create(new("early"), "")
    clock.advance(15 * 3600)  # past midnight in Rome
    offered, answered, abandoned, waiting, _, since = figures(router)
    assert (offered, answered, abandoned, waiting) == (0, 0, 0, 1)  # yesterday's contact still waits
    assert since == datetime(2026, 11, 25, tzinfo=ZONE)


def test_a_restart_from_a_checkpoint_rebuilds_what_the_whole_log_does(
    make_router: Callable[[], Router], clock: Clock, mongo: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = make_router()
    for iid in ("early-abandon", "cancelled", "later-abandon", "waiting", "in-flight"):
        router.create(new(iid), "")
    clock.advance(30)
    router.abandon("early-abandon", "hung up", META)  # closed before the checkpoint
    router.cancel("cancelled", "campaign stopped", META)

    # A write taken in memory but not yet stored when the checkpoint is saved.
    store = router._repo.store
    gate, committing = threading.Event(), store._commit
    monkeypatch.setattr(store, "_commit", lambda batch: (gate.wait(10), committing(batch)))
    held = threading.Thread(target=router.abandon, args=("in-flight", "hung up", META))
    held.start()
    deadline = time.monotonic() + 10
    while router.queue_stats(QUEUE)[1].abandoned < 2 and time.monotonic() < deadline:  # taken in memory
        time.sleep(0.01)
    assert router.checkpoint()
    gate.set()
    held.join(10)

    clock.advance(10)
    router.abandon("later-abandon", "hung up", META)  # open at the checkpoint, closed after it
    for iid in ("new-abandon", "new-waiting"):  # created after the checkpoint
        router.create(new(iid), "")
    clock.advance(40)
    router.abandon("new-abandon", "hung up", META)
    expected = figures(router)
    assert expected[:4] == (6, 0, 4, 2)

    from_checkpoint = make_router()
    assert from_checkpoint.recover() == 2  # "waiting" and "new-waiting"
    assert figures(from_checkpoint) == expected
    from_checkpoint.abandon("waiting", "hung up", META)  # open in memory, as before the restart
    with pytest.raises(PreconditionFailed):  # closed before the checkpoint: read from the store
        from_checkpoint.abandon("early-abandon", "hung up again", META)
    retried = from_checkpoint.create(new("early-abandon"), "")  # a late retry of its creation
    assert retried.status == S.ABANDONED
    after_restart = figures(from_checkpoint)
    assert after_restart[:4] == (6, 0, 5, 1)  # "waiting" left; nothing counted twice

    drop_checkpoint(mongo.topic("routing"))
    whole_log = make_router()
    assert whole_log.recover() == 1
    assert figures(whole_log) == after_restart


def test_a_checkpoint_replaces_the_last_and_a_restart_reads_only_what_follows_it(
    make_router: Callable[[], Router], clock: Clock, mongo: Settings
) -> None:
    router = make_router()
    assert not router.checkpoint()  # nothing written yet by this router
    for n in range(5):
        router.create(new(f"before-{n}"), "")
    assert router.checkpoint()
    first = load_checkpoint(mongo.topic("routing"))
    router.create(new("after"), "")
    assert router.checkpoint()
    second = load_checkpoint(mongo.topic("routing"))
    assert first is not None and second is not None
    assert second.commit > first.commit
    assert second.read_back == sorted([f"before-{n}" for n in range(5)] + ["after"])  # all open
    assert list(router._repo.store.commits_from(second.commit)) == []  # nothing written since
    restarted = make_router()
    assert restarted.recover() == 6
    assert figures(restarted) == figures(router)


def test_a_feed_checkpoint_that_cannot_be_saved_does_not_hold_the_routers_back(
    make_router: Callable[[], Router], mongo: Settings
) -> None:
    router = make_router()
    router.create(new("one"), "")
    # Every agent's view goes in one document: past MongoDB's 16 MB it cannot be saved.
    router._feed._views["huge"] = {**state_view.new_view("huge"), "name": "x" * 17_000_000}
    assert router.checkpoint()
    saved = load_checkpoint(mongo.topic("routing"))
    assert saved is not None and saved.read_back == ["one"]
    assert load_feed_checkpoint(mongo.topic("routing")) is None
