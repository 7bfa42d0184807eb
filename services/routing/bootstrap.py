"""Wires the routing service: one place that knows every concrete dependency."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.kernel import eventstore, mongo
from services.kernel.config import Settings
from services.kernel.grpc_telemetry import instrumented_channel
from services.kernel.outbox import OutboxRelay, relay_for
from services.kernel.repository import Repository
from services.routing.agent_feed import AgentFeed
from services.routing.agents_port import AgentsPort
from services.routing.api import RoutingServicer
from services.routing.domain.queues import load_queues
from services.routing.domain.stats import SL_VARIANTS
from services.routing.events import INTERACTION, REGISTRY
from services.routing.offers import OfferBus
from services.routing.router import Router


@dataclass
class RoutingWiring:
    servicer: RoutingServicer
    router: Router
    feed: AgentFeed
    relay: OutboxRelay


def now() -> datetime:
    return datetime.now(UTC)


def bootstrap(settings: Settings) -> RoutingWiring:
    if settings.service_level_variant not in SL_VARIANTS:
        raise ValueError(f"CENTRALINO_SERVICE_LEVEL_VARIANT must be one of {', '.join(SL_VARIANTS)}")
    queues = load_queues(Path(settings.routing_queues_file) if settings.routing_queues_file else None)
    mongo.connect(settings)
    eventstore.ensure_indexes()
    topic = settings.topic("routing")

    store = eventstore.EventStore(log_name=topic)
    relay = relay_for(
        store,
        settings.kafka_bootstrap,
        topic,
        "centralino-routing",
        settings.relay_interval_s,
        settings.event_retention_ms,
    )
    interactions = Repository(store, REGISTRY, topic, INTERACTION, on_saved=relay.wake)
    agents = AgentsPort(instrumented_channel(settings.grpc_target("agents")))
    bus = OfferBus()
    router: Router | None = None

    def agent_changed(agent_id: str) -> None:
        if router is not None:
            router.wake()

    feed = AgentFeed(settings.kafka_bootstrap, settings.topic("agents"), settings.zone, agent_changed)
    router = Router(
        interactions,
        agents,
        feed,
        bus,
        queues,
        now,
        settings.service_level_variant,
        topic,
        settings.zone,
        settings.routing_closed_retention_s,
        settings.routing_checkpoint_s,
    )
    return RoutingWiring(RoutingServicer(router, bus), router, feed, relay)
