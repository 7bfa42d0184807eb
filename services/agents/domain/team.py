"""Teams: a team leader leads 10-16 agents (span of control); supervisors oversee leaders."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from centralino.v1.agents_pb2 import TeamCreated, TeamLeaderAssigned, TeamMemberJoined, TeamMemberLeft
from google.protobuf.message import Message

from services.agents.domain.agent import Agent
from services.agents.domain.registration import RegisterAgent, check_identifier, check_name
from services.kernel.errors import AlreadyExists, NotFound, PreconditionFailed

SPAN_OF_CONTROL = (10, 16)  # industry norm: 1 leader to 10-16 agents (average team 11.7)


@dataclass(frozen=True)
class Team:
    team_id: str
    version: int = 0
    exists: bool = False
    name: str = ""
    supervisor_id: str = ""
    team_leader_id: str = ""
    members: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class CreateTeam:
    team_id: str
    name: str
    supervisor_id: str = ""


@dataclass(frozen=True)
class AssignTeamLeader:
    team_id: str
    team_leader_id: str
    override_span_of_control: bool = False


def check_team_exists(team: Team) -> None:
    if not team.exists:
        raise NotFound(f"team {team.team_id} does not exist")


def check_span(team: Team, size: int, override: bool, action: str) -> None:
    low, high = SPAN_OF_CONTROL
    if override or low <= size <= high:
        return
    raise PreconditionFailed(
        f"{action} would leave team {team.team_id} with {size} agents; a team leader's span of control is "
        f"{low}-{high} agents (set override_span_of_control to do it anyway)",
        current_state=f"{len(team.members)} agents",
    )


def create_team(command: CreateTeam, team: Team) -> list[Message]:
    check_identifier("team_id", command.team_id)
    check_name(command.name)
    if command.supervisor_id:
        check_identifier("supervisor_id", command.supervisor_id)
    if team.exists:
        raise AlreadyExists(f"team {command.team_id} already exists")
    return [TeamCreated(team_id=command.team_id, name=command.name, supervisor_id=command.supervisor_id)]


def assign_team_leader(command: AssignTeamLeader, team: Team) -> list[Message]:
    check_identifier("team_leader_id", command.team_leader_id)
    check_team_exists(team)
    check_span(team, len(team.members), command.override_span_of_control, "leading it")
    return [
        TeamLeaderAssigned(
            team_id=team.team_id,
            team_leader_id=command.team_leader_id,
            span_override=command.override_span_of_control,
        )
    ]


def registration_interrupted(command: RegisterAgent, agent: Agent, team: Team) -> bool:
    """A registration is two writes, the agent's and then its team's (no transactions
    across aggregates).  If it stopped between them (a crash), the agent is registered
    in a team that does not list it, and a retry of the same registration finishes it."""
    return agent.registered and agent.team_id == command.team_id and command.agent_id not in team.members


def join_team(team: Team, agent_id: str, override: bool) -> list[Message]:
    """An agent joins; more than 16 agents needs an override (below 10 is ramp-up, allowed)."""
    check_team_exists(team)
    if agent_id in team.members:
        return []
    size = len(team.members) + 1
    if size > SPAN_OF_CONTROL[1]:
        check_span(team, size, override, f"adding {agent_id}")
    return [TeamMemberJoined(team_id=team.team_id, agent_id=agent_id, span_override=override)]


def leave_team(team: Team, agent_id: str, override: bool) -> list[Message]:
    """An agent leaves; a led team dropping below 10 agents needs an override."""
    if agent_id not in team.members:
        return []
    size = len(team.members) - 1
    if team.team_leader_id and size < SPAN_OF_CONTROL[0]:
        check_span(team, size, override, f"moving {agent_id} out")
    return [TeamMemberLeft(team_id=team.team_id, agent_id=agent_id, span_override=override)]


def apply_team(team: Team, event: Message) -> Team:
    team = replace(team, version=team.version + 1)
    if isinstance(event, TeamCreated):
        return replace(team, exists=True, name=event.name, supervisor_id=event.supervisor_id)
    if isinstance(event, TeamLeaderAssigned):
        return replace(team, team_leader_id=event.team_leader_id)
    if isinstance(event, TeamMemberJoined):
        return replace(team, members=team.members | {event.agent_id})
    if isinstance(event, TeamMemberLeft):
        return replace(team, members=team.members - {event.agent_id})
    return team


def replay_team(team_id: str, events: Iterable[Message]) -> Team:
    team = Team(team_id=team_id)
    for event in events:
        team = apply_team(team, event)
    return team
