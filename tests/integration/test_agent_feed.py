"""The router's agent feed goes on from the snapshot its checkpoint keeps, not from the
beginning of the agents topic, and comes to the picture a whole-topic read gives."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.agents_pb2 import Transition as T
from google.protobuf.message import Message

from services.agents.events import AGENT
from services.agents.events import REGISTRY as AGENT_EVENTS
from services.kernel import kafka
from services.kernel.config import Settings
from services.kernel.envelope import Metadata, wrap
from services.kernel.kafka import Consumed
from services.routing.agent_feed import AgentFeed
from services.routing.checkpoints import load_feed_checkpoint, save_feed_checkpoint

pytestmark = pytest.mark.integration

ZONE = ZoneInfo("Europe/Rome")
META = Metadata(correlation_id="c-1", causation_id="cmd-1", producer="test")


def registered(agent_id: str) -> pb.AgentRegistered:
    return pb.AgentRegistered(
        agent_id=agent_id,
        name=agent_id.title(),
        team_id="t1",
        seniority=pb.CONSULTANT,
        skills=[pb.Skill(name="sales", proficiency=3)],
        channels=[pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=3)],
    )


def changed(agent_id: str, transition: int, **fields: object) -> pb.AgentStateChanged:
    return pb.AgentStateChanged(agent_id=agent_id, transition=transition, **fields)  # type: ignore[arg-type]


def caught_up(feed: AgentFeed) -> AgentFeed:
    feed.start()
    assert feed.wait_caught_up(30)
    feed.stop()
    return feed


def test_a_feed_goes_on_from_its_snapshot_to_the_picture_of_the_whole_topic(mongo: Settings) -> None:
    topic = mongo.topic("agents")
    kafka.ensure_topics(mongo.kafka_bootstrap, [topic], partitions=3)
    producer = kafka.make_producer(mongo.kafka_bootstrap, "test")
    sequences: dict[str, int] = {}

    def publish(agent_id: str, *events: Message) -> int:
        records: list[kafka.Record] = []
        for event in events:
            sequences[agent_id] = sequences.get(agent_id, 0) + 1
            envelope = wrap(
                event,
                registry=AGENT_EVENTS,
                aggregate_type=AGENT,
                aggregate_id=agent_id,
                sequence=sequences[agent_id],
                meta=META,
            )
            records.append((topic, agent_id.encode(), envelope.SerializeToString(), []))
        producer.send_all(records, timeout_s=30)
        return len(records)

    agents = ["anna", "ewa", "luca", "marek"]
    for agent_id in agents:
        publish(agent_id, registered(agent_id), changed(agent_id, T.LOG_IN), changed(agent_id, T.GO_READY))
    first = caught_up(AgentFeed(mongo.kafka_bootstrap, topic, ZONE, lambda _: None))
    save_feed_checkpoint("routing-log", first.snapshot())

    after = publish("anna", changed("anna", T.RESERVE, interaction_id="i-1", channel=pb.CHAT))
    after += publish("ewa", changed("ewa", T.GO_NOT_READY, reason=pb.BREAK))
    after += publish("zofia", registered("zofia"), changed("zofia", T.LOG_IN))

    snapshot = load_feed_checkpoint("routing-log")  # as a restarted router finds it
    assert snapshot is not None and sorted(snapshot.views) == agents
    restored = AgentFeed(mongo.kafka_bootstrap, topic, ZONE, lambda _: None)
    restored.restore(snapshot)
    read: list[Consumed] = []
    folding = restored._fold

    def counted(record: Consumed) -> None:
        read.append(record)
        folding(record)

    restored._fold = counted  # type: ignore[method-assign]
    caught_up(restored)
    whole = caught_up(AgentFeed(mongo.kafka_bootstrap, topic, ZONE, lambda _: None))

    assert len(read) == after  # only what came after the snapshot
    assert restored.views() == whole.views()
    assert restored.views()["anna"]["work"] and restored.views()["ewa"]["ready"] is False
    assert restored.snapshot().positions == whole.snapshot().positions
