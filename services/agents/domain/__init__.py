"""Agents domain: pure rules (command + state -> events), no grpc, kafka or mongo here."""

from services.agents.domain.agent import Agent, apply, replay
from services.agents.domain.registration import RegisterAgent, move_agent, register_agent
from services.agents.domain.schedule import ScheduleShift, schedule_shift
from services.agents.domain.state_machine import ChangeState, change_state, state_of
from services.agents.domain.team import (
    SPAN_OF_CONTROL,
    AssignTeamLeader,
    CreateTeam,
    Team,
    assign_team_leader,
    create_team,
    join_team,
    leave_team,
    registration_interrupted,
    replay_team,
)

__all__ = [
    "SPAN_OF_CONTROL",
    "Agent",
    "AssignTeamLeader",
    "ChangeState",
    "CreateTeam",
    "RegisterAgent",
    "ScheduleShift",
    "Team",
    "apply",
    "assign_team_leader",
    "change_state",
    "create_team",
    "join_team",
    "leave_team",
    "move_agent",
    "register_agent",
    "registration_interrupted",
    "replay",
    "replay_team",
    "schedule_shift",
    "state_of",
]
