"""Agent event types: stable names and schema versions (the payloads live in proto/)."""

from __future__ import annotations

from centralino.v1 import agents_pb2

from services.kernel.envelope import EventRegistry, EventType

AGGREGATE_TYPE = "Agent"

REGISTRY = EventRegistry(
    [
        EventType("agents.AgentRegistered", agents_pb2.AgentRegistered, version=1),
    ]
)
