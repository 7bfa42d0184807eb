"""Shift schedules: the plan that adherence is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from centralino.v1.agents_pb2 import NotReadyReason, PlannedActivity, ShiftScheduled
from google.protobuf.message import Message

from services.agents.domain.agent import Agent
from services.agents.domain.registration import check_identifier
from services.agents.domain.state_machine import AGENT_REASONS
from services.kernel.errors import InvalidField, NotFound

MAX_SHIFT = timedelta(hours=16)


@dataclass(frozen=True)
class Activity:
    start: datetime
    end: datetime
    productive: bool
    reason: int = 0


@dataclass(frozen=True)
class ScheduleShift:
    agent_id: str
    shift_id: str
    shift_manager_id: str
    start: datetime
    end: datetime
    activities: tuple[Activity, ...]


def check_window(command: ScheduleShift) -> None:
    if not command.start < command.end:
        raise InvalidField("end", "must be after start")
    if command.end - command.start > MAX_SHIFT:
        raise InvalidField("end", f"a shift lasts at most {MAX_SHIFT}")


def check_activities(command: ScheduleShift) -> None:
    if not command.activities:
        raise InvalidField("activities", "a shift needs at least one planned activity")
    previous_end = command.start
    for index, activity in enumerate(sorted(command.activities, key=lambda a: a.start)):
        field = f"activities[{index}]"
        if not activity.start < activity.end:
            raise InvalidField(f"{field}.end", "must be after its start")
        if activity.start < previous_end or activity.end > command.end:
            raise InvalidField(f"{field}.start", "activities must lie inside the shift and not overlap")
        if activity.productive and activity.reason:
            raise InvalidField(f"{field}.reason", "a productive activity has no not-ready reason")
        if not activity.productive and activity.reason not in AGENT_REASONS:
            raise InvalidField(f"{field}.reason", "a planned non-productive activity needs a not-ready reason")
        previous_end = activity.end


def schedule_shift(command: ScheduleShift, agent: Agent) -> list[Message]:
    check_identifier("shift_id", command.shift_id)
    check_identifier("shift_manager_id", command.shift_manager_id)
    check_window(command)
    check_activities(command)
    if not agent.registered:
        raise NotFound(f"agent {command.agent_id} is not registered")
    event = ShiftScheduled(
        agent_id=command.agent_id, shift_id=command.shift_id, shift_manager_id=command.shift_manager_id
    )
    event.start.FromDatetime(command.start)
    event.end.FromDatetime(command.end)
    for activity in sorted(command.activities, key=lambda a: a.start):
        planned = PlannedActivity(productive=activity.productive, reason=cast(NotReadyReason, activity.reason))
        planned.start.FromDatetime(activity.start)
        planned.end.FromDatetime(activity.end)
        event.activities.append(planned)
    return [event]
