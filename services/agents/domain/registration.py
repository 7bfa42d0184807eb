"""Registering an agent: who they are, what they can do, on which channels."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from centralino.v1.agents_pb2 import AgentMovedToTeam, AgentRegistered, Channel, ChannelCapacity, Seniority, Skill
from google.protobuf.message import Message

from services.agents.domain.agent import Agent
from services.kernel.errors import AlreadyExists, InvalidField, NotFound

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
# Industry norm: one voice call at a time; written channels allow a few in parallel.
MAX_CONCURRENT: dict[int, int] = {
    Channel.VOICE: 1,
    Channel.VIDEO: 1,
    Channel.CHAT: 8,
    Channel.SMS: 10,
    Channel.SOCIAL: 10,
    Channel.EMAIL: 10,
}


@dataclass(frozen=True)
class RegisterAgent:
    agent_id: str
    name: str
    team_id: str
    seniority: int
    skills: tuple[tuple[str, int], ...]
    channels: tuple[tuple[int, int], ...]


def check_identifier(field: str, value: str) -> None:
    if not _ID.match(value):
        raise InvalidField(field, "must be 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit")


def check_name(name: str) -> None:
    if not name.strip() or len(name) > 200:
        raise InvalidField("name", "must be 1-200 characters")


def check_seniority(seniority: int) -> None:
    if seniority not in Seniority.values() or seniority == Seniority.SENIORITY_UNSPECIFIED:
        raise InvalidField("seniority", "must be one of " + ", ".join(n for n in Seniority.keys()[1:]))


def check_skills(skills: Iterable[tuple[str, int]]) -> None:
    seen: set[str] = set()
    for index, (name, proficiency) in enumerate(skills):
        check_identifier(f"skills[{index}].name", name)
        if not 1 <= proficiency <= 5:
            raise InvalidField(f"skills[{index}].proficiency", "must be between 1 and 5")
        if name in seen:
            raise InvalidField(f"skills[{index}].name", f"skill {name!r} is listed twice")
        seen.add(name)


def check_channels(channels: Iterable[tuple[int, int]]) -> None:
    seen: set[int] = set()
    for index, (channel, capacity) in enumerate(channels):
        if channel not in MAX_CONCURRENT:
            raise InvalidField(f"channels[{index}].channel", "must be a known channel")
        if not 1 <= capacity <= MAX_CONCURRENT[channel]:
            limit = MAX_CONCURRENT[channel]
            raise InvalidField(f"channels[{index}].max_concurrent", f"must be between 1 and {limit} for this channel")
        if channel in seen:
            raise InvalidField(f"channels[{index}].channel", "channel is listed twice")
        seen.add(channel)
    if not seen:
        raise InvalidField("channels", "an agent needs at least one channel")


def register_agent(command: RegisterAgent, agent: Agent) -> list[Message]:
    check_identifier("agent_id", command.agent_id)
    check_name(command.name)
    check_identifier("team_id", command.team_id)
    check_seniority(command.seniority)
    check_skills(command.skills)
    check_channels(command.channels)
    if agent.registered:
        raise AlreadyExists(f"agent {command.agent_id} is already registered")
    return [
        AgentRegistered(
            agent_id=command.agent_id,
            name=command.name,
            team_id=command.team_id,
            seniority=cast(Seniority, command.seniority),  # validated by check_seniority
            skills=[Skill(name=n, proficiency=p) for n, p in command.skills],
            channels=[ChannelCapacity(channel=cast(Channel, c), max_concurrent=m) for c, m in command.channels],
        )
    ]


def move_agent(agent: Agent, team_id: str) -> list[Message]:
    check_identifier("team_id", team_id)
    if not agent.registered:
        raise NotFound(f"agent {agent.agent_id} is not registered")
    if agent.team_id == team_id:
        raise AlreadyExists(f"agent {agent.agent_id} is already in team {team_id}")
    return [AgentMovedToTeam(agent_id=agent.agent_id, from_team_id=agent.team_id, team_id=team_id)]
