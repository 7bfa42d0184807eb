"""Event store, outbox relay and projection idempotency against the real database and broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import EventEnvelope
from kafka.errors import NoBrokersAvailable

from infra.stack import free_port
from services.agents import adapters
from services.agents.adapters import AgentDocument
from services.agents.events import AGGREGATE_TYPE, REGISTRY
from services.agents.projections import projector
from services.kernel import eventstore, kafka
from services.kernel.config import Settings
from services.kernel.envelope import Metadata
from services.kernel.errors import ConcurrencyConflict
from services.kernel.outbox import OutboxRelay
from services.kernel.repository import Repository
from tests.helpers import read_topic

pytestmark = pytest.mark.integration

META = Metadata(correlation_id="c-1", causation_id="cmd-1", producer="test")


def registered(agent_id: str, name: str = "Anna") -> pb.AgentRegistered:
    return pb.AgentRegistered(agent_id=agent_id, name=name, team_id="t1", seniority=pb.CONSULTANT)


@pytest.fixture
def repository(mongo: Settings) -> Repository:
    eventstore.ensure_indexes()
    adapters.ensure_indexes()
    return Repository(eventstore.EventStore(), REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE)


def test_appends_in_sequence_and_loads_back(repository: Repository) -> None:
    repository.save("a1", 0, [registered("a1")], META)
    repository.save("a1", 1, [registered("a1", "Anna B.")], META)
    assert [e.name for e in repository.load("a1")] == ["Anna", "Anna B."]  # type: ignore[attr-defined]
    assert repository.load("unknown") == []


def test_a_stale_version_is_a_concurrency_conflict(repository: Repository) -> None:
    repository.save("a1", 0, [registered("a1")], META)
    with pytest.raises(ConcurrencyConflict):
        repository.save("a1", 0, [registered("a1", "racer")], META)
    assert len(repository.load("a1")) == 1


def test_events_accepted_during_a_broker_outage_are_published_when_it_returns(
    repository: Repository, mongo: Settings
) -> None:
    dead_broker = f"127.0.0.1:{free_port()}"  # nothing listens there: a real connection refusal
    down = OutboxRelay(eventstore.EventStore(), lambda: kafka.make_producer(dead_broker, "test"))
    repository.save("a1", 0, [registered("a1")], META)
    repository.save("a2", 0, [registered("a2")], META)
    with pytest.raises(NoBrokersAvailable):
        down.drain_once()
    assert len(eventstore.EventStore().unpublished(10)) == 2  # still safe in the store

    def producer():  # type: ignore[no-untyped-def]
        kafka.ensure_topics(mongo.kafka_bootstrap, [mongo.topic("agents")])
        return kafka.make_producer(mongo.kafka_bootstrap, "test")

    up = OutboxRelay(eventstore.EventStore(), producer)
    assert up.drain_once() == 2
    assert up.drain_once() == 0
    keys = sorted(r.key for r in read_topic(mongo.kafka_bootstrap, mongo.topic("agents"), expected=2))
    assert keys == [b"a1", b"a2"]


def test_projecting_the_same_event_twice_changes_nothing(repository: Repository) -> None:
    [envelope] = repository.save("a1", 0, [registered("a1")], META)
    project = projector(ZoneInfo("UTC"))
    assert project(envelope) is True
    first = AgentDocument.objects.get(agent_id="a1").to_mongo().to_dict()
    assert project(EventEnvelope.FromString(envelope.SerializeToString())) is False
    assert AgentDocument.objects.get(agent_id="a1").to_mongo().to_dict() == first
    assert first["events_applied"] == 1 and first["version"] == 1


def test_a_second_writer_is_caught_and_the_cache_reloads(repository: Repository, mongo: Settings) -> None:
    other = Repository(eventstore.EventStore(), REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE)
    repository.save("a1", 0, [registered("a1")], META)
    assert len(repository.history("a1")) == 1  # now cached in this process
    other.save("a1", 1, [registered("a1", "from elsewhere")], META)
    with pytest.raises(ConcurrencyConflict):
        repository.save("a1", 1, [registered("a1", "stale")], META)
    assert [e.name for e in repository.load("a1")] == ["Anna", "from elsewhere"]  # type: ignore[attr-defined]


def test_outbox_entries_a_crash_left_uncommitted_are_settled(repository: Repository) -> None:
    [kept] = repository.save("a1", 0, [registered("a1")], META)
    old = datetime.now(UTC) - timedelta(minutes=5)
    eventstore.PendingEvent.objects(event_id=kept.event_id).update(set__committed=False, set__recorded_at=old)
    ghost = eventstore.PendingEvent(  # its event never reached the store: the command was not accepted
        event_id="ghost",
        aggregate_id="a9",
        sequence=1,
        event_type="agents.AgentRegistered",
        topic="t",
        envelope=b"",
        recorded_at=old,
    )
    ghost.save(force_insert=True)
    assert eventstore.EventStore().unpublished(10) == []
    assert eventstore.EventStore().recover() == 1
    assert [p.event_id for p in eventstore.EventStore().unpublished(10)] == [kept.event_id]
