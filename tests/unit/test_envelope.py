"""Envelope wrapping, stable type names, upcasting and status mapping."""

from __future__ import annotations

import grpc
from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import EventEnvelope

from services.kernel import errors
from services.kernel.envelope import EventRegistry, EventType, Metadata, cloudevents_headers, wrap
from services.kernel.grpc_server import status_for

META = Metadata(correlation_id="journey-1", causation_id="cmd-1", producer="centralino-agents")


def test_wrap_fills_every_envelope_field_and_decodes_back() -> None:
    registry = EventRegistry([EventType("agents.AgentRegistered", pb.AgentRegistered)])
    payload = pb.AgentRegistered(agent_id="a1", name="Anna")
    envelope = wrap(payload, registry=registry, aggregate_type="Agent", aggregate_id="a1", sequence=3, meta=META)
    wire = EventEnvelope.FromString(envelope.SerializeToString())
    assert (wire.event_type, wire.schema_version, wire.aggregate_id, wire.sequence) == (
        "agents.AgentRegistered",
        1,
        "a1",
        3,
    )
    assert (wire.correlation_id, wire.causation_id, wire.producer) == ("journey-1", "cmd-1", "centralino-agents")
    assert len(wire.event_id) == 36 and wire.occurred_at.seconds > 0
    assert registry.decode(wire) == payload
    headers = dict(cloudevents_headers(wire))
    assert headers["ce_id"] == wire.event_id.encode() and headers["ce_type"] == b"agents.AgentRegistered"


def test_old_payload_versions_are_upcast_when_read() -> None:
    # Version 1 of this (made-up) event carried the name in `team_id`; version 2 moved it.
    def v1_to_v2(data: bytes) -> bytes:
        old = pb.AgentRegistered.FromString(data)
        return pb.AgentRegistered(agent_id=old.agent_id, name=old.team_id).SerializeToString()

    old_registry = EventRegistry([EventType("agents.AgentRegistered", pb.AgentRegistered, version=1)])
    new_registry = EventRegistry([EventType("agents.AgentRegistered", pb.AgentRegistered, 2, {1: v1_to_v2})])
    old = wrap(
        pb.AgentRegistered(agent_id="a1", team_id="Anna"),
        registry=old_registry,
        aggregate_type="Agent",
        aggregate_id="a1",
        sequence=1,
        meta=META,
    )
    assert new_registry.decode(old) == pb.AgentRegistered(agent_id="a1", name="Anna")


def test_domain_errors_map_to_grpc_status_codes() -> None:
    assert status_for(errors.InvalidField("name", "empty")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(errors.NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_for(errors.AlreadyExists("x")) == grpc.StatusCode.ALREADY_EXISTS
    assert status_for(errors.PreconditionFailed("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(errors.ConcurrencyConflict("x")) == grpc.StatusCode.ABORTED
