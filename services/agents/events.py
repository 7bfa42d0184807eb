"""Agents department event types: stable names and schema versions (payloads live in proto/)."""

from __future__ import annotations

from centralino.v1 import agents_pb2 as pb

from services.kernel.envelope import EventRegistry, EventType

AGENT = "Agent"
TEAM = "Team"
AGGREGATE_TYPE = AGENT  # kept for callers that only deal with agents


def team_stream(team_id: str) -> str:
    """Teams share the event store and topic with agents; '/' never occurs in an agent id."""
    return f"team/{team_id}"


REGISTRY = EventRegistry(
    [
        EventType("agents.AgentRegistered", pb.AgentRegistered),
        EventType("agents.AgentStateChanged", pb.AgentStateChanged),
        EventType("agents.AgentMovedToTeam", pb.AgentMovedToTeam),
        EventType("agents.ShiftScheduled", pb.ShiftScheduled),
        EventType("agents.TeamCreated", pb.TeamCreated),
        EventType("agents.TeamLeaderAssigned", pb.TeamLeaderAssigned),
        EventType("agents.TeamMemberJoined", pb.TeamMemberJoined),
        EventType("agents.TeamMemberLeft", pb.TeamMemberLeft),
    ]
)
