"""The agent-state read model: counters after a scripted shift, adherence, midnight."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from centralino.v1 import agents_pb2 as pb
from centralino.v1.agents_pb2 import Transition as T

from services.agents import domain, state_view
from services.agents.domain.agent import Agent
from services.agents.domain.schedule import Activity

UTC_ZONE = ZoneInfo("UTC")
DAY = datetime(2026, 11, 2, tzinfo=UTC)
NOW = DAY + timedelta(days=10)


def at(hh: int, mm: int, ss: int = 0) -> datetime:
    return DAY + timedelta(hours=hh, minutes=mm, seconds=ss)


class Script:
    """Runs commands through the domain and folds the events into the view, like the projection."""

    def __init__(self, tz: ZoneInfo = UTC_ZONE) -> None:
        self.tz = tz
        self.agent = Agent(agent_id="a1")
        self.view = state_view.new_view("a1")
        profile = domain.RegisterAgent(
            "a1", "Anna", "t1", pb.CONSULTANT, (("sales", 3),), ((pb.VOICE, 1), (pb.CHAT, 2))
        )
        self._fold(domain.register_agent(profile, self.agent), at(7, 0))

    def _fold(self, events: list, when: datetime) -> None:
        for event in events:
            self.agent = domain.apply(self.agent, event, when)
            self.view = state_view.evolve(self.view, event, when.timestamp(), self.agent.version, self.tz)

    def do(self, when: datetime, transition: int, **fields: object) -> Script:
        command = domain.ChangeState(agent_id="a1", transition=transition, at=when, **fields)  # type: ignore[arg-type]
        self._fold(domain.change_state(command, self.agent, NOW), when)
        return self

    def schedule(self, start: datetime, end: datetime, *activities: Activity) -> Script:
        command = domain.ScheduleShift("a1", "s1", "sm1", start, end, activities)
        self._fold(domain.schedule_shift(command, self.agent), at(7, 0))
        return self


def call(script: Script, iid: str, offered: datetime, talk_s: int, hold_s: int, acw_s: int) -> None:
    """Reserve 10 s, talk (half before and half after the hold), wrap up."""
    t = offered
    script.do(t, T.RESERVE, interaction_id=iid, channel=pb.VOICE)
    t += timedelta(seconds=10)
    script.do(t, T.CONNECT, interaction_id=iid)
    t += timedelta(seconds=talk_s // 2)
    if hold_s:
        script.do(t, T.HOLD, interaction_id=iid)
        t += timedelta(seconds=hold_s)
        script.do(t, T.RESUME, interaction_id=iid)
    t += timedelta(seconds=talk_s - talk_s // 2)
    script.do(t, T.END, interaction_id=iid)
    t += timedelta(seconds=acw_s)
    script.do(t, T.COMPLETE_WRAP_UP, interaction_id=iid, wrap_up_code="resolved")


def scripted_shift() -> Script:
    s = Script()
    s.schedule(
        at(8, 0),
        at(10, 0),
        Activity(at(8, 0), at(9, 0), productive=True),
        Activity(at(9, 0), at(9, 15), productive=False, reason=pb.BREAK),
        Activity(at(9, 15), at(10, 0), productive=True),
    )
    s.do(at(8, 2), T.LOG_IN)  # 2 minutes late
    s.do(at(8, 3), T.GO_READY)  # 1 min not ready (unspecified)
    call(s, "i1", at(8, 10), talk_s=300, hold_s=60, acw_s=120)  # 08:10:00 -> 08:18:10
    call(s, "i2", at(8, 30), talk_s=200, hold_s=0, acw_s=40)  # 08:30:00 -> 08:34:10
    s.do(at(9, 5), T.GO_NOT_READY, reason=pb.BREAK)  # 5 min late for the break
    s.do(at(9, 20), T.GO_READY)  # 5 min into productive time
    s.do(at(9, 50), T.LOG_OUT)  # leaves 10 min early
    return s


def test_counters_after_a_scripted_shift_are_exact() -> None:
    view = scripted_shift().view
    c = state_view.day_counters(state_view.up_to(view, NOW.timestamp(), UTC_ZONE), "2026-11-02")
    assert c["handled"] == 2
    assert (c["talk_s"], c["hold_s"], c["after_call_work_s"]) == (500.0, 60.0, 160.0)
    assert (c["reserved_s"], c["busy_s"], c["after_call_work_wall_s"]) == (20.0, 560.0, 160.0)
    # ready: 08:03-08:10 (420) + 08:18:10-08:30 (710) + 08:34:10-09:05 (1850) + 09:20-09:50 (1800)
    assert c["ready_s"] == 420 + 710 + 1850 + 1800
    assert c["not_ready_s"] == {"UNSPECIFIED": 60.0, "BREAK": 900.0}
    contact = 20 + 560 + 160
    assert c["occupancy"] == contact / (contact + 4780)
    assert c["average_handle_time_s"] == (500 + 60 + 160) / 2
    assert view["state"] == pb.LOGGED_OUT and view["work"] == [] and view["available_on"] == []


def test_adherence_against_the_schedule() -> None:
    [shift] = state_view.adherence(scripted_shift().view, NOW.timestamp())
    # out: 08:00-08:03 (logged out, then not ready), 09:00-09:05 (working in break), 09:15-09:20, 09:50-10:00
    out = 180 + 300 + 300 + 600
    assert shift == {
        "shift_id": "s1",
        "scheduled_s": 7200.0,
        "in_adherence_s": 7200.0 - out,
        "out_of_adherence_s": float(out),
        "adherence": (7200 - out) / 7200,
    }


def test_open_intervals_count_up_to_now_without_changing_the_stored_view() -> None:
    s = Script().do(at(8, 0), T.LOG_IN).do(at(8, 1), T.GO_READY)
    s.do(at(8, 2), T.RESERVE, interaction_id="c1", channel=pb.CHAT).do(at(8, 3), T.CONNECT, interaction_id="c1")
    stored = s.view
    now = at(8, 13).timestamp()
    c = state_view.day_counters(state_view.up_to(stored, now, UTC_ZONE), "2026-11-02")
    assert (c["talk_s"], c["busy_s"], c["ready_s"], c["reserved_s"]) == (600.0, 600.0, 60.0, 60.0)
    assert state_view.day_counters(stored, "2026-11-02")["talk_s"] == 0.0
    assert stored["available_on"] == [pb.CHAT]  # a second chat fits; a call never joins a chat


def test_time_is_split_at_local_midnight() -> None:
    rome = ZoneInfo("Europe/Rome")
    s = Script(tz=rome)
    s.do(DAY + timedelta(hours=22, minutes=30), T.LOG_IN)  # 23:30 in Rome (UTC+1)
    s.do(DAY + timedelta(hours=23, minutes=30), T.GO_READY)  # 00:30 next day in Rome
    days = s.view["days"]
    assert days["2026-11-02"]["not_ready_s"] == {"UNSPECIFIED": 1800.0}
    assert days["2026-11-03"]["not_ready_s"] == {"UNSPECIFIED": 1800.0}


def test_redelivered_state_is_identical_to_the_first_fold() -> None:
    first = scripted_shift()
    second = scripted_shift()
    assert first.view == second.view


def test_folding_and_reading_never_change_an_earlier_view() -> None:
    """Views share what is only ever replaced; every container written into is copied."""
    s = Script()
    s.schedule(at(8, 0), at(10, 0), Activity(at(8, 0), at(10, 0), productive=True))
    kept: list[tuple[state_view.View, state_view.View]] = []
    original_fold = s._fold

    def fold_keeping(events: list, when: datetime) -> None:
        kept.append((s.view, copy.deepcopy(s.view)))
        original_fold(events, when)

    s._fold = fold_keeping  # type: ignore[method-assign]
    s.do(at(8, 0), T.LOG_IN).do(at(8, 1), T.GO_NOT_READY, reason=pb.BREAK).do(at(8, 5), T.GO_READY)
    call(s, "i1", at(8, 10), talk_s=300, hold_s=60, acw_s=120)
    s.do(at(8, 20), T.RESERVE, interaction_id="c1", channel=pb.CHAT).do(at(8, 21), T.CONNECT, interaction_id="c1")
    before_reading = copy.deepcopy(s.view)
    state_view.day_counters(state_view.up_to(s.view, at(9, 0).timestamp(), UTC_ZONE), "2026-11-02")
    assert s.view == before_reading
    assert len(kept) == 11
    for view, snapshot in kept:
        assert view == snapshot


def test_a_reader_of_today_alone_keeps_today_and_yesterday_with_the_same_figures() -> None:
    """The router's agent feed folds with days_kept=1: each event copies only those days."""
    s = scripted_shift()  # 2026-11-02, with a shift 08:00-10:00
    s.do(at(11, 0), T.LOG_IN).do(at(11, 1), T.GO_READY)
    later = (at(11, 1) + timedelta(days=5)).timestamp()
    break_ = pb.AgentStateChanged(agent_id="a1", transition=T.GO_NOT_READY, state=pb.NOT_READY, reason=pb.BREAK)

    full = state_view.evolve(s.view, break_, later, s.agent.version + 1, UTC_ZONE)
    short = state_view.evolve(s.view, break_, later, s.agent.version + 1, UTC_ZONE, days_kept=1)
    today = state_view.day_of(later, UTC_ZONE)
    assert len(full["days"]) == 6 and sorted(short["days"]) == sorted(full["days"])[-2:]
    assert short == {**full, "days": short["days"], "shifts": {}}
    now = later + 3600
    assert state_view.day_counters(state_view.up_to(short, now, UTC_ZONE), today) == state_view.day_counters(
        state_view.up_to(full, now, UTC_ZONE), today
    )


def test_a_view_keeps_the_counters_and_shifts_of_its_last_days_only() -> None:
    """A view is rewritten on every change of its agent: it must not grow for years."""
    s = scripted_shift()  # 2026-11-02, with a shift 08:00-10:00
    s.do(at(11, 0), T.LOG_IN).do(at(11, 1), T.GO_READY)
    still = at(11, 1) + timedelta(days=state_view.DAYS_KEPT - 1)
    gone = at(11, 1) + timedelta(days=state_view.DAYS_KEPT + 1)
    break_ = pb.AgentStateChanged(agent_id="a1", transition=T.GO_NOT_READY, state=pb.NOT_READY, reason=pb.BREAK)

    kept = state_view.evolve(s.view, break_, still.timestamp(), s.agent.version + 1, UTC_ZONE)
    assert "2026-11-02" in kept["days"] and set(kept["shifts"]) == {"s1"}
    assert len(kept["days"]) == state_view.DAYS_KEPT  # every day since, ready all along

    later = state_view.evolve(s.view, break_, gone.timestamp(), s.agent.version + 1, UTC_ZONE)
    assert min(later["days"]) == state_view.oldest_day_kept(gone.timestamp(), UTC_ZONE) > "2026-11-02"
    assert later["shifts"] == {} and len(later["days"]) == state_view.DAYS_KEPT + 1
    assert later["days"][state_view.day_of(gone.timestamp(), UTC_ZONE)]["ready_s"] == 11 * 3600 + 60
