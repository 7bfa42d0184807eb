"""Event store, outbox relay and projection idempotency against the real database and broker."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import CommitBatch, CommittedEvent, EventEnvelope
from kafka.partitioner.default import DefaultPartitioner
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from infra.stack import free_port
from services.agents import adapters
from services.agents.adapters import AgentDocument
from services.agents.events import AGGREGATE_TYPE, REGISTRY
from services.agents.projections import projector
from services.kernel import eventstore, kafka, outbox
from services.kernel.config import Settings
from services.kernel.envelope import Metadata, wrap
from services.kernel.errors import ConcurrencyConflict
from services.kernel.outbox import OutboxRelay
from services.kernel.repository import Repository
from services.kernel.telemetry import headers_for
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
    with pytest.raises(kafka.BrokerUnavailable):
        down.drain_once()
    assert len(eventstore.EventStore().unpublished(10)[0]) == 2  # still safe in the store

    def producer():  # type: ignore[no-untyped-def]
        kafka.ensure_topics(mongo.kafka_bootstrap, [mongo.topic("agents")])
        return kafka.make_producer(mongo.kafka_bootstrap, "test")

    up = OutboxRelay(eventstore.EventStore(), producer)
    assert up.drain_once() == 2
    assert up.drain_once() == 0
    keys = sorted(r.key for r in read_topic(mongo.kafka_bootstrap, mongo.topic("agents"), expected=2))
    assert keys == [b"a1", b"a2"]


def test_a_relay_that_failed_to_publish_sends_the_same_events_again(mongo: Settings) -> None:
    store = eventstore.EventStore()  # one store, as in a service: the relay reads its commits from memory
    repository = Repository(store, REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE)
    dead_broker = f"127.0.0.1:{free_port()}"
    repository.save("b1", 0, [registered("b1")], META)
    with pytest.raises(kafka.BrokerUnavailable):
        OutboxRelay(store, lambda: kafka.make_producer(dead_broker, "test")).drain_once()

    def producer():  # type: ignore[no-untyped-def]
        kafka.ensure_topics(mongo.kafka_bootstrap, [mongo.topic("agents")])
        return kafka.make_producer(mongo.kafka_bootstrap, "test")

    repository.save("b2", 0, [registered("b2")], META)
    assert OutboxRelay(store, producer).drain_once() == 2
    keys = sorted(r.key for r in read_topic(mongo.kafka_bootstrap, mongo.topic("agents"), expected=2))
    assert keys == [b"b1", b"b2"]


def test_projecting_the_same_event_twice_changes_nothing(repository: Repository) -> None:
    [envelope] = repository.save("a1", 0, [registered("a1")], META)
    project = projector(ZoneInfo("UTC"))
    assert project(envelope) is True
    first = AgentDocument.objects.get(agent_id="a1").to_mongo().to_dict()
    assert project(EventEnvelope.FromString(envelope.SerializeToString())) is False
    assert AgentDocument.objects.get(agent_id="a1").to_mongo().to_dict() == first
    assert first["events_applied"] == 1 and first["version"] == 1


def test_days_and_shifts_are_stored_as_text_and_documents_written_before_still_read(repository: Repository) -> None:
    project = projector(ZoneInfo("UTC"))
    changes = [pb.AgentStateChanged(agent_id="a1", transition=t) for t in (pb.LOG_IN, pb.GO_READY, pb.GO_NOT_READY)]
    for version, event in enumerate([registered("a1"), *changes]):
        [envelope] = repository.save("a1", version, [event], META)
        assert project(envelope) is True
    raw = AgentDocument._get_collection().find_one({"_id": "a1"})
    assert isinstance(raw["days"], str) and isinstance(raw["shifts"], str)  # one value each for FerretDB
    view = AgentDocument.objects.get(agent_id="a1").to_view()
    assert view["days"] and isinstance(view["days"], dict) and view["shifts"] == {}
    # As documents were written before: nested documents.
    nested = {"days": json.loads(raw["days"]), "shifts": json.loads(raw["shifts"])}
    AgentDocument._get_collection().update_one({"_id": "a1"}, {"$set": nested})
    assert AgentDocument.objects.get(agent_id="a1").to_view() == view


def test_a_second_writer_is_caught_and_the_cache_reloads(repository: Repository, mongo: Settings) -> None:
    other = Repository(eventstore.EventStore(), REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE)
    repository.save("a1", 0, [registered("a1")], META)
    assert len(repository.history("a1")) == 1  # now cached in this process
    other.save("a1", 1, [registered("a1", "from elsewhere")], META)
    with pytest.raises(ConcurrencyConflict):
        repository.save("a1", 1, [registered("a1", "stale")], META)
    assert [e.name for e in repository.load("a1")] == ["Anna", "from elsewhere"]  # type: ignore[attr-defined]


def test_the_cache_keeps_the_newest_events_and_reads_the_rest_from_the_store(mongo: Settings) -> None:
    repository = Repository(eventstore.EventStore(), REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE, keep_events=3)
    names = [f"name {n}" for n in range(8)]
    for version, name in enumerate(names):
        repository.save("a1", version, [registered("a1", name)], META)
    repository.history("a1")  # read once: cached, then trimmed to the newest 3
    repository.save("a1", 8, [registered("a1", "name 8")], META)  # extends the cache
    names.append("name 8")
    assert repository._cache["a1"].base == 6 and len(repository._cache["a1"].events) == 3
    assert [e.name for e, _ in repository.since("a1", 7) or []] == names[7:]  # type: ignore[attr-defined]
    assert repository.since("a1", 9) == []
    # Before what the cache holds, and the whole history: read from the store.
    assert [e.name for e, _ in repository.since("a1", 2) or []] == names[2:]  # type: ignore[attr-defined]
    assert [e.name for e in repository.load("a1")] == names  # type: ignore[attr-defined]
    assert repository.since("a1", 10) is None  # a state ahead of the store is not this aggregate's
    other = Repository(eventstore.EventStore(), REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE)
    other.save("a1", 9, [registered("a1", "from elsewhere")], META)
    with pytest.raises(ConcurrencyConflict):  # the cache is stale: dropped, read again
        repository.save("a1", 9, [registered("a1", "stale")], META)
    assert [e.name for e, _ in repository.since("a1", 8) or []] == ["name 8", "from elsewhere"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("collection", "key"),
    [
        (eventstore.EVENTS_COLLECTION, eventstore.commit_key),
        # An intent written before intents joined the events (an upgrade after a crash).
        (eventstore.LEGACY_COMMITS_COLLECTION, eventstore.legacy_commit_key),
    ],
)
def test_a_commit_a_crash_left_unmarked_is_settled_from_the_store(
    repository: Repository, collection: str, key: Callable[[str, int], str]
) -> None:
    repository.save("a1", 0, [registered("a1")], META)
    store = eventstore.EventStore()
    _, position = store.unpublished(10)
    store.mark_published(position)  # the relay is past everything so far
    ghost = EventEnvelope(event_id="ghost", aggregate_id="a9", sequence=1, event_type="agents.AgentRegistered")
    # A crash after an intent and one of its two events: a1's second event is in the store, a9's is not.
    [second] = repository.save("a1", 1, [registered("a1", "again")], META)
    commits = eventstore.collection(collection)
    number = position + 2  # the save above took position + 1; this intent is the one a crash left
    batch = CommitBatch(
        events=[
            CommittedEvent(topic="t", envelope=second.SerializeToString()),
            CommittedEvent(topic="t", envelope=ghost.SerializeToString()),
        ]
    )
    old = datetime.now(UTC) - timedelta(minutes=5)
    commits.insert_one({"_id": key("events", number), "batch": batch.SerializeToString(), "at": old})
    relay_view = eventstore.EventStore()
    events, after = relay_view.unpublished(10)
    assert [EventEnvelope.FromString(e.envelope).event_id for e in events] == [second.event_id, second.event_id]
    assert after == number


def test_concurrent_writes_share_commits_and_reach_the_relay_in_memory(mongo: Settings) -> None:
    store = eventstore.EventStore()
    repository = Repository(store, REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE)
    before = store.unpublished(10_000)[1]
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda n: repository.save(f"agent-{n}", 0, [registered(f"agent-{n}")], META), range(200)))
    # The relay does not read its own commits back.
    eventstore.collection(eventstore.EVENTS_COLLECTION).delete_many({"batch": {"$exists": True}})
    events, after = store.unpublished(10_000)
    assert len(events) == 200
    assert after - before < 200  # fewer commits than writes: they were grouped
    assert all(len(repository.load(f"agent-{n}")) == 1 for n in range(200))


@pytest.mark.parametrize("fillers", [0, 120], ids=["one insert", "intent first (over 100 documents)"])
def test_a_commit_goes_on_past_a_race_it_lost(repository: Repository, mongo: Settings, fillers: int) -> None:
    """One commit in which one aggregate's race is lost: its writes fail, and only they; every
    other write lands whole and in order, and the relay publishes exactly what landed."""
    topic = mongo.topic("agents")
    other = Repository(eventstore.EventStore(), REGISTRY, topic, AGGREGATE_TYPE)
    other.save("taken", 0, [registered("taken", "winner")], META)

    def write(aggregate: str, version: int, *names: str) -> Any:
        envelopes = [
            wrap(
                registered(aggregate, name),
                registry=REGISTRY,
                aggregate_type=AGGREGATE_TYPE,
                aggregate_id=aggregate,
                sequence=version + offset,
                meta=META,
            )
            for offset, name in enumerate(names, start=1)
        ]
        return eventstore._Write(topic, envelopes, {}, None)

    writes = [
        write("fresh-1", 0, "a", "b"),
        write("taken", 0, "loser", "built on the loser"),
        write("fresh-2", 0, "c"),
        write("fresh-1", 2, "d"),
        *(write(f"filler-{n}", 0, "e") for n in range(fillers)),
    ]
    store = eventstore.EventStore()
    before = store.unpublished(10_000)[1]
    store.mark_published(before)  # the relay is past the winner's commit
    store._commit(writes)  # one batch, as the committer thread would take it

    assert writes[1].future.exception(timeout=10) is not None
    assert all(w.future.exception(timeout=10) is None for i, w in enumerate(writes) if i != 1)
    names = {a: [e.name for e in repository.load(a)] for a in ("fresh-1", "taken", "fresh-2")}  # type: ignore[attr-defined]
    assert names == {"fresh-1": ["a", "b", "d"], "taken": ["winner"], "fresh-2": ["c"]}
    events, after = store.unpublished(10_000)
    assert after == before + 1  # one commit number
    published = [EventEnvelope.FromString(e.envelope) for e in events]
    assert [(e.aggregate_id, e.sequence) for e in published][:4] == [
        ("fresh-1", 1),
        ("fresh-1", 2),
        ("fresh-2", 1),
        ("fresh-1", 3),
    ]
    assert len(published) == 4 + fillers
    intents = eventstore.collection(eventstore.EVENTS_COLLECTION)
    assert intents.find_one({"_id": eventstore.commit_key("events", after)}) is not None


def test_a_write_building_on_a_refused_one_is_refused_too(repository: Repository, mongo: Settings) -> None:
    other = Repository(eventstore.EventStore(), REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE)
    other.save("a1", 0, [registered("a1", "winner")], META)
    _, first = repository.submit("a1", 0, [registered("a1", "loser")], META)
    _, second = repository.submit("a1", 1, [registered("a1", "built on the loser")], META)
    with pytest.raises(ConcurrencyConflict):
        first.result(timeout=10)
    with pytest.raises(ConcurrencyConflict):
        second.result(timeout=10)
    assert [e.name for e in repository.load("a1")] == ["winner"]  # type: ignore[attr-defined]


def test_of_racing_writes_on_one_version_exactly_one_lands(repository: Repository) -> None:
    store = eventstore.EventStore()
    for round_ in range(5):
        aggregate = f"contested-{round_}"
        # Submitted back to back, most of them share one group commit: the race is decided inside it.
        futures = [repository.submit(aggregate, 0, [registered(aggregate, f"writer {n}")], META)[1] for n in range(20)]
        landed = []
        for n, future in enumerate(futures):
            try:
                future.result(timeout=10)
                landed.append(n)
            except ConcurrencyConflict:
                pass
        assert len(landed) == 1
        [stored] = repository.load(aggregate)
        assert stored.name == f"writer {landed[0]}"  # type: ignore[attr-defined]
    events, _ = store.unpublished(10_000)
    contested = [EventEnvelope.FromString(e.envelope) for e in events]
    assert sorted(e.aggregate_id for e in contested if e.aggregate_id.startswith("contested")) == [
        f"contested-{n}" for n in range(5)
    ]  # the relay publishes only the winners


def test_chained_writes_across_many_commits_never_leave_a_gap(repository: Repository, mongo: Settings) -> None:
    """Chains of writes spread over many group commits, half of them on aggregates another
    writer got to first: whatever the timing, the store holds no gap and agrees with what
    every caller was told."""
    other = Repository(eventstore.EventStore(), REGISTRY, mongo.topic("agents"), AGGREGATE_TYPE)
    aggregates = [f"chain-{n}" for n in range(40)]
    taken = set(aggregates[::2])
    for aggregate in taken:  # another writer already holds version 1 of every other aggregate
        other.save(aggregate, 0, [registered(aggregate, "winner")], META)
    chains: dict[str, list[Future[None]]] = {a: [] for a in aggregates}
    for link in range(5):  # interleaved, so the links of one chain land in different commits
        for aggregate in aggregates:
            _, written = repository.submit(aggregate, link, [registered(aggregate, f"link {link}")], META)
            chains[aggregate].append(written)

    for aggregate, futures in chains.items():
        accepted = set()
        for link, future in enumerate(futures):
            try:
                future.result(timeout=20)
                accepted.add(f"link {link}")
            except ConcurrencyConflict:
                pass
        stored = [event.name for event in eventstore_names(aggregate)]
        assert eventstore.collection("event_store").count_documents({"aggregate_id": aggregate}) == len(stored)
        assert set(stored) - {"winner"} == accepted, (aggregate, stored, accepted)
        if aggregate in taken:
            assert stored[0] == "winner" and "link 0" not in accepted
        else:
            assert stored == [f"link {n}" for n in range(5)]


def eventstore_names(aggregate_id: str) -> list[Any]:
    return [REGISTRY.decode(envelope) for envelope in eventstore.EventStore().load(aggregate_id)]


def test_events_land_on_the_partition_the_java_client_and_faust_choose(mongo: Settings) -> None:
    """The relays' producer (librdkafka) partitions keys as kafka-python and aiokafka do
    (the Java client's murmur2), so an aggregate's events stay on one partition across
    producers and across the change of producer."""
    topic = mongo.topic("partitioning")
    kafka.ensure_topics(mongo.kafka_bootstrap, [topic], partitions=3)
    keys = [f"agent-{n}".encode() for n in range(40)]
    landed = kafka.make_producer(mongo.kafka_bootstrap, "test").send_all(
        [(topic, key, b"event", []) for key in keys], timeout_s=30
    )
    java = DefaultPartitioner()
    assert [where.partition for where in landed] == [java(key, [0, 1, 2], [0, 1, 2]) for key in keys]
    assert len({where.partition for where in landed}) == 3


def test_a_topic_reader_reads_every_partition_from_the_offsets_it_is_given(mongo: Settings) -> None:
    """The whole-topic reader (the router's agent feed, the team watch): its beginnings and
    ends are those of the topic when it was made, it reads each partition in order from where
    it starts, and its positions say how far it has read."""
    topic = mongo.topic("reader")
    kafka.ensure_topics(mongo.kafka_bootstrap, [topic], partitions=3)
    producer = kafka.make_producer(mongo.kafka_bootstrap, "test")
    first = producer.send_all([(topic, f"a-{n}".encode(), f"1-{n}".encode(), []) for n in range(12)], timeout_s=30)
    reader = kafka.TopicReader(mongo.kafka_bootstrap, topic, client_id="test-reader")
    later = kafka.TopicReader(mongo.kafka_bootstrap, topic, client_id="test-reader-later")
    try:
        ends = {p: sum(1 for where in first if where.partition == p) for p in range(3)}
        assert (reader.beginnings, reader.ends) == ({0: 0, 1: 0, 2: 0}, ends)
        reader.start_at(reader.beginnings)
        later.start_at(later.ends)  # from the end: only what comes after it was made
        second = producer.send_all([(topic, b"a-0", b"2-0", [])], timeout_s=30)

        def read_all(source: kafka.TopicReader, count: int) -> list[kafka.Consumed]:
            records: list[kafka.Consumed] = []
            for _ in range(100):
                records += source.poll(timeout_s=0.1)
                if len(records) >= count:
                    break
            return records

        records = read_all(reader, 13)
        assert sorted(r.value for r in records) == sorted([f"1-{n}".encode() for n in range(12)] + [b"2-0"])
        for p in range(3):
            offsets = [r.offset for r in records if r.partition == p]
            assert offsets == list(range(len(offsets)))  # in order, none skipped
            assert reader.position(p) == len(offsets)
        assert [(r.partition, r.offset, r.value) for r in read_all(later, 1)] == [
            (second[0].partition, second[0].offset, b"2-0")
        ]
    finally:
        reader.close()
        later.close()


def test_a_batch_is_one_producer_span_and_each_record_names_its_own_request(mongo: Settings) -> None:
    """The relay's batch is one PRODUCER span, child of its first record's request and linked
    to every request it carries; each record's traceparent names the request that stored its
    event, so its consumer continues that request's trace (its creation context)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    topic = mongo.topic("batch-span")
    kafka.ensure_topics(mongo.kafka_bootstrap, [topic], partitions=3)
    first, second = tracer.start_span("request 1"), tracer.start_span("request 2")
    stored_by = {"agent-1": first, "agent-2": first, "agent-3": second}
    batch = [
        eventstore.Unpublished(
            topic,
            wrap(
                registered(agent_id),
                registry=REGISTRY,
                aggregate_type=AGGREGATE_TYPE,
                aggregate_id=agent_id,
                sequence=1,
                meta=META,
            ).SerializeToString(),
            headers_for(request),
            datetime.now(UTC),
        )
        for agent_id, request in stored_by.items()
    ]
    outbox.publish(kafka.make_producer(mongo.kafka_bootstrap, "relay"), batch, timeout_s=30, tracer=tracer)

    [span] = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert span.name == f"send {topic}"
    assert span.parent is not None and span.parent.span_id == first.get_span_context().span_id
    assert {link.context.span_id for link in span.links} == {r.get_span_context().span_id for r in (first, second)}
    assert span.attributes is not None and span.attributes["messaging.batch.message_count"] == 3
    records = read_topic(mongo.kafka_bootstrap, topic, expected=3)
    parents = {record.key.decode(): dict(record.headers)["traceparent"].decode() for record in records}
    assert parents == {agent_id: headers_for(request)["traceparent"] for agent_id, request in stored_by.items()}
