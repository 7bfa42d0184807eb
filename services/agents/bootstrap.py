"""Wires the agents service: one place that knows every concrete dependency."""

from __future__ import annotations

from dataclasses import dataclass

from services.agents.adapters import AgentDocument
from services.agents.application import AgentsApplication
from services.agents.events import AGGREGATE_TYPE, REGISTRY
from services.kernel import eventstore, kafka, mongo
from services.kernel.config import Settings
from services.kernel.outbox import OutboxRelay
from services.kernel.repository import Repository


@dataclass
class AgentsWiring:
    application: AgentsApplication
    relay: OutboxRelay


def bootstrap(settings: Settings) -> AgentsWiring:
    mongo.connect(settings)
    eventstore.ensure_indexes()
    AgentDocument.ensure_indexes()
    topic = settings.topic("agents")

    def producer():  # type: ignore[no-untyped-def]
        kafka.ensure_topics(settings.kafka_bootstrap, [topic])
        return kafka.make_producer(settings.kafka_bootstrap, client_id="centralino-agents")

    relay = OutboxRelay(eventstore.EventStore(), producer, interval_s=settings.relay_interval_s)
    repository = Repository(eventstore.EventStore(), REGISTRY, topic, AGGREGATE_TYPE, on_saved=relay.wake)
    return AgentsWiring(AgentsApplication(repository), relay)
