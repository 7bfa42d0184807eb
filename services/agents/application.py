"""Agents use cases: load -> act -> save.  Queries live in queries.py."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import Message

from services.agents import domain
from services.agents.events import team_stream
from services.kernel.envelope import Metadata
from services.kernel.errors import ConcurrencyConflict, DomainError
from services.kernel.repository import Repository

Clock = Callable[[], datetime]
TEAM_WRITE_ATTEMPTS = 5  # membership changes race only with other changes of the same team
AGENT_WRITE_ATTEMPTS = 5
Changed = list[EventEnvelope] | DomainError  # a change's envelopes, or why it was refused
SNAPSHOT_EVERY = 100  # events: a read after a restart folds at most this many


class Snapshots(Protocol):
    """Where the folded agents are saved now and then (adapters.AgentSnapshots)."""

    def load(self, agent_id: str) -> domain.Agent | None: ...

    def save_later(self, agent: domain.Agent) -> None: ...


class AgentsApplication:
    def __init__(
        self,
        agents: Repository,
        teams: Repository,
        clock: Clock = lambda: datetime.now(UTC),
        snapshots: Snapshots | None = None,
        snapshot_every: int = SNAPSHOT_EVERY,
    ) -> None:
        self._agents = agents
        self._teams = teams
        self._clock = clock
        self._snapshots = snapshots
        self._snapshot_every = snapshot_every
        self._folded: dict[str, domain.Agent] = {}  # as of the last call: only newer events are applied

    def _agent(self, agent_id: str) -> domain.Agent:
        """The agent folded from its history: only the events after the state kept from
        the last call, or else after its latest snapshot, are read and applied (an
        agent's history grows by four events per interaction, all day, every day)."""
        known = self._folded.get(agent_id) or (self._snapshots.load(agent_id) if self._snapshots else None)
        if known is not None:
            newer = self._agents.since(agent_id, known.version)
            if newer is not None:
                return self._fold(known, newer)
        return self._fold(domain.replay(agent_id, []), self._agents.history(agent_id))

    def _fold(self, agent: domain.Agent, events: list[tuple[Message, datetime]]) -> domain.Agent:
        before = agent.version
        for event, at in events:
            agent = domain.apply(agent, event, at)
        self._folded[agent.agent_id] = agent
        if self._snapshots is not None and agent.version // self._snapshot_every > before // self._snapshot_every:
            self._snapshots.save_later(agent)  # committed events only: what was read
        return agent

    def _team(self, team_id: str) -> domain.Team:
        return domain.replay_team(team_id, self._teams.load(team_stream(team_id)))

    def register_agent(
        self, command: domain.RegisterAgent, meta: Metadata, override_span: bool = False
    ) -> list[EventEnvelope]:
        agent, team = self._agent(command.agent_id), self._team(command.team_id)

        def join(team: domain.Team) -> list[Message]:
            return domain.join_team(team, command.agent_id, override_span)

        if domain.registration_interrupted(command, agent, team):  # a retry: finish it, answer as the first time
            self._change_team(command.team_id, join, meta)
            return self._agents.stored(command.agent_id)[:1]
        events = domain.register_agent(command, agent)
        join(team)  # refuse before writing
        envelopes = self._agents.save(command.agent_id, agent.version, events, meta)
        self._change_team(command.team_id, join, meta)
        return envelopes

    def change_state(self, command: domain.ChangeState, meta: Metadata, stamp_now: bool = False) -> list[EventEnvelope]:
        """Routing and the agent's own desktop change the same agent at once (a chat ends
        while another is offered): a lost race is decided again on the fresh state.
        `stamp_now`: the change happens when it is decided (no time given by the caller)."""
        for attempt in range(AGENT_WRITE_ATTEMPTS):
            agent = self._agent(command.agent_id)
            if stamp_now:  # stamped after reading: later than any change the read includes
                command = replace(command, at=self._clock())
            events = domain.change_state(command, agent, self._clock())
            try:
                return self._agents.save(command.agent_id, agent.version, events, meta, occurred_at=command.at)
            except ConcurrencyConflict:
                if attempt == AGENT_WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def change_states(self, commands: Sequence[tuple[domain.ChangeState, Metadata, bool]]) -> list[Changed]:
        """Several changes, decided in order; per change, its envelopes or why it was refused.

        Each agent's changes are decided one after the other on the state the earlier
        ones leave, and written as one append: one write per agent, all agents in one
        group commit.  An agent whose append loses a race has its changes decided
        again, one by one, on the fresh state."""
        outcomes: list[Changed | None] = [None] * len(commands)
        by_agent: dict[str, list[int]] = defaultdict(list)
        for index, (command, _, _) in enumerate(commands):
            by_agent[command.agent_id].append(index)
        writes = [
            (indexes, *self._decide_for(agent_id, indexes, commands, outcomes))
            for agent_id, indexes in by_agent.items()
        ]
        for indexes, accepted, envelopes, written in writes:
            try:
                written.result()
            except ConcurrencyConflict:  # decided on a stale state: refusals too
                for index in indexes:
                    outcomes[index] = self._change_alone(commands[index])
                continue
            for index, count in accepted.items():
                outcomes[index], envelopes = envelopes[:count], envelopes[count:]
        assert all(outcome is not None for outcome in outcomes)  # every change accepted or refused
        return [outcome for outcome in outcomes if outcome is not None]

    def _decide_for(
        self,
        agent_id: str,
        indexes: list[int],
        commands: Sequence[tuple[domain.ChangeState, Metadata, bool]],
        outcomes: list[Changed | None],
    ) -> tuple[dict[int, int], list[EventEnvelope], Future[None]]:
        agent = self._agent(agent_id)  # read before stamping, as in change_state
        version = agent.version
        events: list[Message] = []
        metas: list[Metadata] = []
        times: list[datetime] = []
        accepted: dict[int, int] = {}  # command index -> how many events it made
        for index in indexes:
            command, meta, stamp_now = commands[index]
            command = replace(command, at=self._clock()) if stamp_now else command
            try:
                made = domain.change_state(command, agent, self._clock())
            except DomainError as refused:
                outcomes[index] = refused
                continue
            for event in made:
                agent = domain.apply(agent, event, command.at)
            events += made
            metas += [meta] * len(made)
            times += [command.at] * len(made)
            accepted[index] = len(made)
        envelopes, written = self._agents.submit(agent_id, version, events, metas, times)
        return accepted, envelopes, written

    def _change_alone(self, command: tuple[domain.ChangeState, Metadata, bool]) -> Changed:
        try:
            return self.change_state(*command)
        except DomainError as refused:
            return refused

    def schedule_shift(self, command: domain.ScheduleShift, meta: Metadata) -> list[EventEnvelope]:
        agent = self._agent(command.agent_id)
        events = domain.schedule_shift(command, agent)
        return self._agents.save(command.agent_id, agent.version, events, meta)

    def create_team(self, command: domain.CreateTeam, meta: Metadata) -> domain.Team:
        team = self._team(command.team_id)
        self._teams.save(team_stream(command.team_id), team.version, domain.create_team(command, team), meta)
        return self._team(command.team_id)

    def assign_team_leader(self, command: domain.AssignTeamLeader, meta: Metadata) -> domain.Team:
        return self._change_team(command.team_id, lambda team: domain.assign_team_leader(command, team), meta)

    def move_agent(self, agent_id: str, team_id: str, override_span: bool, meta: Metadata) -> domain.Team:
        """Leave the old team, join the new one, then record the move on the agent."""
        agent = self._agent(agent_id)
        moved = domain.move_agent(agent, team_id)
        domain.join_team(self._team(team_id), agent_id, override_span)  # refuse before writing anything
        domain.leave_team(self._team(agent.team_id), agent_id, override_span)
        self._change_team(agent.team_id, lambda team: domain.leave_team(team, agent_id, override_span), meta)
        team = self._change_team(team_id, lambda team: domain.join_team(team, agent_id, override_span), meta)
        self._agents.save(agent_id, agent.version, moved, meta)
        return team

    def _change_team(self, team_id: str, decide: Callable[[domain.Team], list[Message]], meta: Metadata) -> domain.Team:
        """Decide on the latest team state, retrying when another change won the race."""
        for attempt in range(TEAM_WRITE_ATTEMPTS):
            team = self._team(team_id)
            try:
                self._teams.save(team_stream(team_id), team.version, decide(team), meta)
                return self._team(team_id)
            except ConcurrencyConflict:
                if attempt == TEAM_WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")
