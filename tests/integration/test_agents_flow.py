"""The foundation's end-to-end path: gRPC command -> Kafka -> Faust -> MongoDB read model.

Real processes throughout: the agents gRPC server and its Faust worker run as
subprocesses against the session's Kafka and MongoDB-wire database.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import EventEnvelope
from kafka import KafkaAdminClient, KafkaProducer
from kafka.structs import TopicPartition

from services.agents.adapters import AgentDocument
from services.kernel.eventstore import StoredEvent
from tests.helpers import eventually, read_topic
from tests.integration.conftest import AgentsService

pytestmark = pytest.mark.integration

TRACE_ID = uuid.uuid4().hex
TRACEPARENT = f"00-{TRACE_ID}-{uuid.uuid4().hex[:16]}-01"


@pytest.fixture(scope="module")
def flow(agents: AgentsService) -> AgentsService:
    agents.create_team("team-1", supervisor_id="sup-1")
    return agents


def register(service: AgentsService, agent_id: str, **overrides: Any) -> pb.RegisterAgentResponse:
    overrides.setdefault("correlation_id", "journey-42")
    return service.register(agent_id, metadata=[("traceparent", TRACEPARENT)], **overrides)


def projected(agent_id: str) -> AgentDocument | None:
    return AgentDocument.objects(agent_id=agent_id).first()


def snapshot(agent_id: str) -> dict[str, Any]:
    return eventually(lambda: projected(agent_id)).to_mongo().to_dict()


def test_command_reaches_kafka_and_the_read_model_with_its_trace(flow: AgentsService) -> None:
    settings = flow.settings
    reply = register(flow, "anna.rossi")
    assert (reply.agent_id, reply.version) == ("anna.rossi", 1)

    [record] = [r for r in read_topic(settings.kafka_bootstrap, settings.topic("agents"), 3) if r.key == b"anna.rossi"]
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
    assert document.skills == [{"name": "customer_service", "proficiency": 5}, {"name": "lang:it", "proficiency": 5}]
    assert document.channels == [{"channel": pb.VOICE, "max_concurrent": 1}]
    assert (document.version, document.events_applied, document.last_event_id) == (1, 1, reply.event_id)
    assert document.trace_id == TRACE_ID  # gRPC metadata -> outbox -> Kafka header -> Faust span -> MongoDB

    view = flow.stub.GetAgent(pb.GetAgentRequest(agent_id="anna.rossi"))
    assert (view.name, view.version, view.team_id) == ("Anna Rossi", 1, "team-1")


def test_redelivered_event_leaves_the_read_model_unchanged(flow: AgentsService) -> None:
    settings = flow.settings
    register(flow, "marek.nowak", name="Marek Nowak")
    before = snapshot("marek.nowak")
    [original] = [
        r for r in read_topic(settings.kafka_bootstrap, settings.topic("agents"), 5) if r.key == b"marek.nowak"
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


def test_bad_input_names_the_field_and_writes_nothing(flow: AgentsService) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        register(flow, "giulia", skills=[pb.Skill(name="sales", proficiency=9)])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "skills[0].proficiency" in refused.value.details()
    assert ("field", "skills[0].proficiency") in tuple(refused.value.trailing_metadata())

    register(flow, "ewa")
    with pytest.raises(grpc.RpcError) as twice:
        register(flow, "ewa")
    assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert StoredEvent.objects(aggregate_id="giulia").count() == 0  # refused: nothing accepted, nothing to publish
    assert StoredEvent.objects(aggregate_id="ewa").count() == 1
    with pytest.raises(grpc.RpcError) as no_team:
        register(flow, "piotr", team_id="no-such-team")
    assert no_team.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-team" in no_team.value.details()
