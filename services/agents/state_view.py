"""The agent-state read model, as pure functions over a JSON-able dict.

The same dict lives in the Faust table (routing-speed reads) and in MongoDB
(queries).  It is folded from the agent's events with their event times, so a
replay of the topic rebuilds exactly the same documents.  The domain's own
`apply` decides what each event does to presence and work items; this module
only adds time accounting on top.

Time accounting:
- wall time per derived state (ready, reserved, busy, after-call work, not ready
  by reason) and per interaction phase (talk, hold, after-call work), split at
  midnight in the contact center's time zone;
- adherence per scheduled shift: seconds whose actual state matches the plan.

A view keeps the counters of its last DAYS_KEPT days and the shifts that ended within
them: it is rewritten on every change of its agent, so it must not grow with the
agent's years of service.  Older figures belong to reporting, not to the live view.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from centralino.v1.agents_pb2 import (
    AgentMovedToTeam,
    AgentRegistered,
    AgentState,
    AgentStateChanged,
    NotReadyReason,
    ShiftScheduled,
    Transition,
)
from google.protobuf.message import Message

from services.agents.domain.agent import Agent, WorkItem, apply, state_of
from services.agents.domain.state_machine import available_channels
from services.kernel.envelope import epoch_seconds

View = dict[str, Any]
DAYS_KEPT = 92  # a quarter: this month's and last month's reports read the live view
CONTACT_STATES = (AgentState.RESERVED, AgentState.BUSY, AgentState.AFTER_CALL_WORK)
PRODUCTIVE_STATES = frozenset({AgentState.READY, *CONTACT_STATES})
_STATE_COUNTER = {
    AgentState.READY: "ready_s",
    AgentState.RESERVED: "reserved_s",
    AgentState.BUSY: "busy_s",
    AgentState.AFTER_CALL_WORK: "after_call_work_wall_s",
}
_PHASE_COUNTER = {"connected": "talk_s", "held": "hold_s", "wrap_up": "after_call_work_s"}


def new_view(agent_id: str) -> View:
    return {
        "agent_id": agent_id,
        "name": "",
        "team_id": "",
        "seniority": 0,
        "skills": [],
        "channels": [],
        "logged_in": False,
        "ready": False,
        "state": AgentState.LOGGED_OUT,
        "reason": 0,
        "since": None,
        "accounted_until": None,
        "work": [],
        "available_on": [],
        "days": {},
        "shifts": {},
        "version": 0,
    }


def reason_name(reason: int) -> str:
    return NotReadyReason.Name(reason) if reason else "UNSPECIFIED"


# ---- time helpers -------------------------------------------------------------


def split_by_day(start: float, end: float, tz: ZoneInfo) -> list[tuple[str, float]]:
    """[(YYYY-MM-DD, seconds)] of the interval, cut at local midnights."""
    pieces: list[tuple[str, float]] = []
    cursor = datetime.fromtimestamp(start, tz)
    stop = datetime.fromtimestamp(end, tz)
    while cursor < stop:
        midnight = datetime.combine(cursor.date() + timedelta(days=1), datetime.min.time(), tz)
        piece_end = min(midnight, stop)
        pieces.append((cursor.date().isoformat(), piece_end.timestamp() - cursor.timestamp()))
        cursor = piece_end
    return pieces


def day_of(at: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(at, tz).date().isoformat()


def _new_day() -> dict[str, Any]:
    return {
        "handled": 0,
        "talk_s": 0.0,
        "hold_s": 0.0,
        "after_call_work_s": 0.0,
        "ready_s": 0.0,
        "reserved_s": 0.0,
        "busy_s": 0.0,
        "after_call_work_wall_s": 0.0,
        "not_ready_s": {},
    }


def _day(view: View, day: str) -> dict[str, Any]:
    return view["days"].setdefault(day, _new_day())


def _add(view: View, start: float, end: float, counter: str, tz: ZoneInfo, reason: int | None = None) -> None:
    for day, seconds in split_by_day(start, end, tz):
        counters = _day(view, day)
        if reason is None:
            counters[counter] += seconds
        else:
            by_reason = counters["not_ready_s"]
            by_reason[reason_name(reason)] = by_reason.get(reason_name(reason), 0.0) + seconds


def _overlap(a_start: float, a_end: float, b_start: float, b_end: float) -> float:
    return max(0.0, min(a_end, b_end) - max(a_start, b_start))


def _adherent(activity: dict[str, Any], state: int, reason: int) -> bool:
    if activity["productive"]:
        return state in PRODUCTIVE_STATES
    return state == AgentState.NOT_READY and reason == activity["reason"]


def _in_adherence(view: View, start: float, end: float, state: int, reason: int, shift: dict[str, Any]) -> float:
    return sum(_overlap(start, end, a["start"], a["end"]) for a in shift["activities"] if _adherent(a, state, reason))


def _account_state(view: View, start: float, end: float, tz: ZoneInfo) -> None:
    state, reason = view["state"], view["reason"]
    if state == AgentState.NOT_READY:
        _add(view, start, end, "", tz, reason=reason)
    elif state in _STATE_COUNTER:
        _add(view, start, end, _STATE_COUNTER[state], tz)
    for shift in view["shifts"].values():
        shift["in_adherence_s"] += _in_adherence(view, start, end, state, reason, shift)


# ---- folding events --------------------------------------------------------------


def as_agent(view: View) -> Agent:
    """The domain's Agent for this view: presence, channels and work items."""
    return Agent(
        agent_id=view["agent_id"],
        registered=bool(view["name"]),
        team_id=view["team_id"],
        channels=tuple((c["channel"], c["max_concurrent"]) for c in view["channels"]),
        logged_in=view["logged_in"],
        ready=view["ready"],
        reason=view["reason"],
        work=tuple(WorkItem(w["interaction_id"], w["channel"], w["phase"]) for w in view["work"]),
    )


def _account_work(view: View, before: Agent, after: Agent, at: float, tz: ZoneInfo) -> list[dict[str, Any]]:
    """Close the phase of every work item the event changed; keep the others running."""
    since = {w["interaction_id"]: w["since"] for w in view["work"]}
    kept = {w.interaction_id: w for w in after.work}
    for item in before.work:
        if kept.get(item.interaction_id) != item:
            if item.phase in _PHASE_COUNTER:
                _add(view, since[item.interaction_id], at, _PHASE_COUNTER[item.phase], tz)
            since.pop(item.interaction_id)
    return [
        {
            "interaction_id": w.interaction_id,
            "channel": w.channel,
            "phase": w.phase,
            "since": since.get(w.interaction_id, at),
        }
        for w in after.work
    ]


def _profile(view: View, event: Message) -> None:
    if isinstance(event, AgentRegistered):
        view.update(
            name=event.name,
            team_id=event.team_id,
            seniority=event.seniority,
            skills=[{"name": s.name, "proficiency": s.proficiency} for s in event.skills],
            channels=[{"channel": c.channel, "max_concurrent": c.max_concurrent} for c in event.channels],
        )
    elif isinstance(event, AgentMovedToTeam):
        view["team_id"] = event.team_id
    elif isinstance(event, ShiftScheduled):
        previous = view["shifts"].get(event.shift_id, {})
        view["shifts"][event.shift_id] = {
            "shift_manager_id": event.shift_manager_id,
            "start": epoch_seconds(event.start),
            "end": epoch_seconds(event.end),
            "activities": [
                {
                    "start": epoch_seconds(a.start),
                    "end": epoch_seconds(a.end),
                    "productive": a.productive,
                    "reason": a.reason,
                }
                for a in event.activities
            ],
            "in_adherence_s": previous.get("in_adherence_s", 0.0),
        }


def _copy(view: View) -> View:
    """A copy whose containers this module writes into are its own; the rest (profile
    lists, shift activities) is shared, being only ever replaced.  A deep copy cost the
    router's agent feed and the projection about a twentieth of their CPU."""
    copied = dict(view)
    copied["days"] = {day: _copy_day(counters) for day, counters in view["days"].items()}
    copied["shifts"] = {shift_id: dict(shift) for shift_id, shift in view["shifts"].items()}
    copied["work"] = [dict(item) for item in view["work"]]
    return copied


def _copy_day(counters: dict[str, Any]) -> dict[str, Any]:
    return {**counters, "not_ready_s": dict(counters["not_ready_s"])}


def evolve(view: View, event: Message, at: float, sequence: int, tz: ZoneInfo, days_kept: int = DAYS_KEPT) -> View:
    """The view after `event` (which happened at epoch `at`); the input is not modified.

    Only state changes move the accounting clock: a registration or a schedule
    published today says nothing about what the agent did at that moment.  A reader
    that needs only today's figures (the router) keeps fewer days: each event copies
    the days kept.
    """
    view = _copy(view)
    _profile(view, event)
    after = apply(as_agent(view), event)
    if isinstance(event, AgentStateChanged):
        _state_changed(view, event, after, at, tz)
    view.update(available_on=available_channels(after), version=sequence)
    _forget_before(view, at, tz, days_kept)
    return view


def oldest_day_kept(at: float, tz: ZoneInfo, days_kept: int = DAYS_KEPT) -> str:
    """The first day whose counters a view folded up to `at` still holds."""
    return day_of(at - days_kept * 86400, tz)


def _forget_before(view: View, at: float, tz: ZoneInfo, days_kept: int) -> None:
    # By event time, not the clock: a replay of the log folds the same views.
    cutoff, oldest = at - days_kept * 86400, oldest_day_kept(at, tz, days_kept)
    if any(day < oldest for day in view["days"]):  # "YYYY-MM-DD" sorts as dates do
        view["days"] = {day: counters for day, counters in view["days"].items() if day >= oldest}
    if any(shift["end"] < cutoff for shift in view["shifts"].values()):
        view["shifts"] = {key: shift for key, shift in view["shifts"].items() if shift["end"] >= cutoff}


def _state_changed(view: View, event: AgentStateChanged, after: Agent, at: float, tz: ZoneInfo) -> None:
    if view["accounted_until"] is not None and at > view["accounted_until"]:
        _account_state(view, view["accounted_until"], at, tz)
    view["accounted_until"] = max(at, view["accounted_until"] or at)
    view["work"] = _account_work(view, as_agent(view), after, at, tz)
    if event.transition == Transition.COMPLETE_WRAP_UP:
        _day(view, day_of(at, tz))["handled"] += 1
    state = state_of(after)
    reason = after.reason if after.logged_in and not after.ready else 0
    if (state, reason) != (view["state"], view["reason"]) or view["since"] is None:
        view["since"] = at
    view.update(logged_in=after.logged_in, ready=after.ready, state=state, reason=reason)


# ---- reading, with the interval still open up to `now` -------------------------------


def up_to(view: View, now: float, tz: ZoneInfo) -> View:
    """The view as if one more (empty) event happened at `now`: open intervals closed."""
    view = _copy(view)
    if view["accounted_until"] is not None and now > view["accounted_until"]:
        _account_state(view, view["accounted_until"], now, tz)
        for item in view["work"]:
            if item["phase"] in _PHASE_COUNTER:
                _add(view, item["since"], now, _PHASE_COUNTER[item["phase"]], tz)
            item["since"] = now
        view["accounted_until"] = now
    return view


def day_counters(view: View, day: str) -> dict[str, Any]:
    stored = view["days"].get(day)
    counters = _copy_day(stored) if stored else _new_day()
    contact = counters["reserved_s"] + counters["busy_s"] + counters["after_call_work_wall_s"]
    idle = counters["ready_s"]
    handle = counters["talk_s"] + counters["hold_s"] + counters["after_call_work_s"]
    counters["occupancy"] = contact / (contact + idle) if contact + idle else 0.0
    counters["average_handle_time_s"] = handle / counters["handled"] if counters["handled"] else 0.0
    counters["day"] = day
    return counters


def adherence(view: View, now: float) -> list[dict[str, Any]]:
    """Per shift: scheduled seconds elapsed by `now`, and how many matched the plan."""
    result = []
    for shift_id, shift in sorted(view["shifts"].items()):
        elapsed = sum(_overlap(a["start"], a["end"], a["start"], min(now, a["end"])) for a in shift["activities"])
        inside = min(shift["in_adherence_s"], elapsed)
        result.append(
            {
                "shift_id": shift_id,
                "scheduled_s": elapsed,
                "in_adherence_s": inside,
                "out_of_adherence_s": elapsed - inside,
                "adherence": inside / elapsed if elapsed else 0.0,
            }
        )
    return result


def utc(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)
