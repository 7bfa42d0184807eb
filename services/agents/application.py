"""Agents use cases: load -> act -> save."""

from __future__ import annotations

from centralino.v1.envelope_pb2 import EventEnvelope

from services.agents import domain
from services.agents.adapters import AgentDocument
from services.kernel.envelope import Metadata
from services.kernel.errors import NotFound
from services.kernel.repository import Repository


class AgentsApplication:
    def __init__(self, agents: Repository) -> None:
        self._agents = agents

    def register_agent(self, command: domain.RegisterAgent, meta: Metadata) -> list[EventEnvelope]:
        agent = domain.replay(command.agent_id, self._agents.load(command.agent_id))
        events = domain.register_agent(command, agent)
        return self._agents.save(command.agent_id, agent.version, events, meta)

    def get_agent(self, agent_id: str) -> AgentDocument:
        document = AgentDocument.objects(agent_id=agent_id).first()
        if document is None:
            raise NotFound(f"agent {agent_id} is not known (or not projected yet)")
        return document
