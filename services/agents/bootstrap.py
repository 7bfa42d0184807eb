"""Wires the agents service: one place that knows every concrete dependency."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from services.agents import adapters
from services.agents.api import AgentsServicer
from services.agents.application import AgentsApplication
from services.agents.events import AGENT, REGISTRY, TEAM
from services.agents.queries import AgentQueries
from services.agents.watch import TeamWatchHub
from services.kernel import eventstore, mongo
from services.kernel.config import Settings
from services.kernel.outbox import OutboxRelay, relay_for
from services.kernel.repository import Repository


@dataclass
class AgentsWiring:
    servicer: AgentsServicer
    relay: OutboxRelay
    hub: TeamWatchHub


def now() -> datetime:
    return datetime.now(UTC)


def bootstrap(settings: Settings) -> AgentsWiring:
    mongo.connect(settings)
    eventstore.ensure_indexes()
    adapters.ensure_indexes()
    topic = settings.topic("agents")
    store = eventstore.EventStore(log_name=topic)
    relay = relay_for(
        store,
        settings.kafka_bootstrap,
        topic,
        "centralino-agents",
        settings.relay_interval_s,
        settings.event_retention_ms,
    )
    agents = Repository(store, REGISTRY, topic, AGENT, on_saved=relay.wake)
    teams = Repository(store, REGISTRY, topic, TEAM, on_saved=relay.wake)
    hub = TeamWatchHub(settings.kafka_bootstrap, topic)
    application = AgentsApplication(agents, teams, clock=now, snapshots=adapters.AgentSnapshots())
    servicer = AgentsServicer(application, AgentQueries(settings.zone, now), hub, now)
    return AgentsWiring(servicer, relay, hub)
