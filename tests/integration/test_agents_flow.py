"""The foundation's end-to-end path: gRPC command -> Kafka -> Faust -> MongoDB read model.

Real processes throughout: the agents gRPC server and its Faust worker run as
subprocesses against the session's Kafka and MongoDB-wire database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import mongoengine
import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1 import agents_pb2_grpc
from centralino.v1.envelope_pb2 import EventEnvelope
from kafka import KafkaAdminClient, KafkaProducer
from kafka.structs import TopicPartition

from infra.stack import free_port
from services.agents.adapters import AgentDocument
from services.kernel import mongo as kernel_mongo
from services.kernel.config import Settings
from services.kernel.eventstore import StoredEvent
from services.kernel.runner import ServiceProcess
from tests.helpers import eventually, read_topic

pytestmark = pytest.mark.integration

WORKER_READY = "[^Worker]: Ready"
TRACE_ID = uuid.uuid4().hex
TRACEPARENT = f"00-{TRACE_ID}-{uuid.uuid4().hex[:16]}-01"


@pytest.fixture(scope="module")
def flow(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, str]]:
    """The agents server and projection worker for this module, in a namespace of its own."""
    state = tmp_path_factory.mktemp("agents-flow")
    settings = Settings(
        kafka_bootstrap=stack["kafka_bootstrap"],
        mongo_url=stack["mongo_url"],
        namespace=f"t{uuid.uuid4().hex[:12]}",
        state_dir=state,
        relay_interval_s=0.2,
    )
    port = free_port()
    env = {
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "MONGO_URL": settings.mongo_url,
        "CENTRALINO_NAMESPACE": settings.namespace,
        "CENTRALINO_STATE_DIR": str(state),
        "CENTRALINO_RELAY_INTERVAL_S": "0.2",
        "AGENTS_GRPC_PORT": str(port),
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(Path.cwd() / "gen")]),
    }
    server = ServiceProcess("services.agents.server", env, state / "server.log").start()
    worker = ServiceProcess("services.agents.worker", env, state / "worker.log").start()
    kernel_mongo.connect(settings)
    try:
        server.wait_healthy(f"127.0.0.1:{port}")
        worker.wait_log(WORKER_READY)
        yield settings, f"127.0.0.1:{port}"
    finally:
        server.stop()
        worker.stop()
        mongoengine.connection.get_connection().drop_database(settings.mongo_db)
        kernel_mongo.disconnect()


def register(target: str, agent_id: str, **overrides: Any) -> pb.RegisterAgentResponse:
    fields: dict[str, Any] = {
        "agent_id": agent_id,
        "name": "Anna Rossi",
        "team_id": "team-1",
        "seniority": pb.SENIOR_CONSULTANT,
        "skills": [pb.Skill(name="customer_service", proficiency=5), pb.Skill(name="lang:it", proficiency=5)],
        "channels": [pb.ChannelCapacity(channel=pb.VOICE, max_concurrent=1)],
        "correlation_id": "journey-42",
    }
    fields.update(overrides)
    with grpc.insecure_channel(target) as channel:
        stub = agents_pb2_grpc.AgentsServiceStub(channel)
        return stub.RegisterAgent(
            pb.RegisterAgentRequest(**fields), metadata=[("traceparent", TRACEPARENT)], timeout=10
        )


def projected(agent_id: str) -> AgentDocument | None:
    return AgentDocument.objects(agent_id=agent_id).first()


def snapshot(agent_id: str) -> dict[str, Any]:
    return eventually(lambda: projected(agent_id)).to_mongo().to_dict()


def test_command_reaches_kafka_and_the_read_model_with_its_trace(flow: tuple[Settings, str]) -> None:
    settings, target = flow
    reply = register(target, "anna.rossi")
    assert (reply.agent_id, reply.version) == ("anna.rossi", 1)

    [record] = read_topic(settings.kafka_bootstrap, settings.topic("agents"), expected=1)
    envelope = EventEnvelope.FromString(record.value)
    headers = {key: value.decode() for key, value in record.headers}
    assert record.key == b"anna.rossi"
    assert (envelope.event_id, envelope.event_type, envelope.schema_version) == (
        reply.event_id,
        "agents.AgentRegistered",
        1,
    )
    assert (envelope.aggregate_type, envelope.aggregate_id, envelope.sequence) == ("Agent", "anna.rossi", 1)
    assert envelope.correlation_id == "journey-42" and envelope.causation_id
    assert envelope.producer == "centralino-agents"
    assert headers["ce_id"] == reply.event_id and headers["ce_type"] == "agents.AgentRegistered"
    assert headers["traceparent"].split("-")[1] == TRACE_ID

    document = eventually(lambda: projected("anna.rossi"))
    assert (document.name, document.team_id, document.seniority) == ("Anna Rossi", "team-1", pb.SENIOR_CONSULTANT)
    assert [(s.name, s.proficiency) for s in document.skills] == [("customer_service", 5), ("lang:it", 5)]
    assert [(c.channel, c.max_concurrent) for c in document.channels] == [(pb.VOICE, 1)]
    assert (document.version, document.events_applied, document.last_event_id) == (1, 1, reply.event_id)
    assert document.trace_id == TRACE_ID  # gRPC metadata -> outbox -> Kafka header -> Faust span -> MongoDB

    with grpc.insecure_channel(target) as channel:
        view = agents_pb2_grpc.AgentsServiceStub(channel).GetAgent(pb.GetAgentRequest(agent_id="anna.rossi"))
    assert (view.name, view.version) == ("Anna Rossi", 1)


def test_redelivered_event_leaves_the_read_model_unchanged(flow: tuple[Settings, str]) -> None:
    settings, target = flow
    register(target, "marek.nowak", name="Marek Nowak")
    before = snapshot("marek.nowak")
    [original] = [
        r for r in read_topic(settings.kafka_bootstrap, settings.topic("agents"), 2) if r.key == b"marek.nowak"
    ]

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    duplicate = producer.send(
        original.topic, key=original.key, value=original.value, headers=original.headers, partition=original.partition
    ).get(timeout=10)
    producer.close()

    # Wait until the projection's consumer group has committed past the duplicate.
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    partition = TopicPartition(original.topic, original.partition)

    def committed_past_duplicate() -> bool:
        offsets = admin.list_consumer_group_offsets(settings.consumer_group("agents-projections"))
        return partition in offsets and offsets[partition].offset > duplicate.offset

    eventually(committed_past_duplicate)
    admin.close()
    assert snapshot("marek.nowak") == before


def test_bad_input_names_the_field_and_writes_nothing(flow: tuple[Settings, str]) -> None:
    _, target = flow
    with pytest.raises(grpc.RpcError) as refused:
        register(target, "giulia", skills=[pb.Skill(name="sales", proficiency=9)])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "skills[0].proficiency" in refused.value.details()
    assert ("field", "skills[0].proficiency") in tuple(refused.value.trailing_metadata())

    register(target, "ewa")
    with pytest.raises(grpc.RpcError) as twice:
        register(target, "ewa")
    assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert StoredEvent.objects(aggregate_id="giulia").count() == 0  # refused: nothing accepted, nothing to publish
    assert StoredEvent.objects(aggregate_id="ewa").count() == 1
