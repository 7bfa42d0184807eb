"""Read side: agent state, lists and team statistics from the read models.

Counters are stored up to the agent's last event; each read closes the open
interval at the time of the query, so "busy for 3 minutes" keeps counting.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from centralino.v1.agents_pb2 import AgentState

from services.agents import state_view
from services.agents.adapters import AgentDocument, TeamDocument
from services.kernel.errors import InvalidField, NotFound


@dataclass(frozen=True)
class AgentFilter:
    team_id: str = ""
    skill: str = ""
    min_proficiency: int = 0
    state: int = 0
    available_on: int = 0


@dataclass(frozen=True)
class AgentReport:
    view: dict[str, Any]  # the state view closed at the time of the query
    today: dict[str, Any]
    adherence: list[dict[str, Any]]


@dataclass(frozen=True)
class TeamReport:
    team: TeamDocument
    agents: list[AgentReport]
    by_state: dict[str, int]
    handled: int
    occupancy: float
    average_handle_time_s: float


class AgentQueries:
    def __init__(self, tz: ZoneInfo, clock: Callable[[], datetime]) -> None:
        self._tz = tz
        self._clock = clock

    def _report(self, view: dict[str, Any], day: str) -> AgentReport:
        now = self._clock().timestamp()
        current = state_view.up_to(view, now, self._tz)
        day = day or state_view.day_of(now, self._tz)
        return AgentReport(current, state_view.day_counters(current, day), state_view.adherence(current, now))

    def agent(self, agent_id: str, day: str = "") -> AgentReport:
        check_day(day)
        document = AgentDocument.objects(agent_id=agent_id).first()
        if document is None:
            raise NotFound(f"agent {agent_id} is not known (or not projected yet)")
        view = document.to_view()
        self._check_kept(view, day)
        return self._report(view, day)

    def _check_kept(self, view: dict[str, Any], day: str) -> None:
        """A day the view no longer holds is an error, not a day of zeros."""
        if not day or view["accounted_until"] is None:
            return
        oldest = state_view.oldest_day_kept(view["accounted_until"], self._tz)
        if day < oldest:
            raise InvalidField("day", f"per-day counters are kept for {state_view.DAYS_KEPT} days: from {oldest}")

    def agents(self, wanted: AgentFilter) -> list[AgentReport]:
        query: dict[str, Any] = {}
        if wanted.team_id:
            query["team_id"] = wanted.team_id
        if wanted.state:
            query["state"] = wanted.state
        if wanted.available_on:
            query["available_on"] = wanted.available_on
        if wanted.skill:
            query["__raw__"] = {"skills.name": wanted.skill}
        documents = AgentDocument.objects(**query).order_by("agent_id")
        # Proficiency is checked here: FerretDB v1's $elemMatch takes no field conditions.
        return [self._report(d.to_view(), "") for d in documents if has_skill(d.skills, wanted)]

    def team(self, team_id: str) -> TeamReport:
        team = TeamDocument.objects(team_id=team_id).first()
        if team is None:
            raise NotFound(f"team {team_id} is not known (or not projected yet)")
        reports = self.agents(AgentFilter(team_id=team_id))
        by_state = Counter(AgentState.Name(r.view["state"]) for r in reports)
        handled = sum(r.today["handled"] for r in reports)
        contact = sum(r.today["reserved_s"] + r.today["busy_s"] + r.today["after_call_work_wall_s"] for r in reports)
        idle = sum(r.today["ready_s"] for r in reports)
        handle = sum(r.today["talk_s"] + r.today["hold_s"] + r.today["after_call_work_s"] for r in reports)
        return TeamReport(
            team=team,
            agents=reports,
            by_state=dict(by_state),
            handled=handled,
            occupancy=contact / (contact + idle) if contact + idle else 0.0,
            average_handle_time_s=handle / handled if handled else 0.0,
        )


def has_skill(skills: list[dict[str, Any]], wanted: AgentFilter) -> bool:
    if not wanted.skill:
        return True
    minimum = wanted.min_proficiency or 1
    return any(s["name"] == wanted.skill and s["proficiency"] >= minimum for s in skills)


def check_day(day: str) -> None:
    if not day:
        return
    try:
        datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        raise InvalidField("day", "must be a date as YYYY-MM-DD") from None
