"""Routing rules, pure: ordering, aging, bullseye targets, strategies, pacing, KPIs, the Interaction."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from centralino.v1.agents_pb2 import CHAT, VOICE
from centralino.v1.routing_pb2 import INBOUND, OUTBOUND
from centralino.v1.routing_pb2 import InteractionStatus as S
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kernel.errors import InvalidField, PreconditionFailed
from services.routing.domain import interaction as domain
from services.routing.domain.interaction import CreateInteraction, Interaction
from services.routing.domain.matching import Candidate, plan
from services.routing.domain.queues import QueueConfig, default_queues, inbound_queue, queue_for
from services.routing.domain.stats import SL_VARIANTS, DayTallies, Tally, is_waiting, kpis, queue_kpis

T0 = 1_800_000_000.0
QUEUES = default_queues()
CS_IT = QUEUES["customer_service.it"]


def waiting(
    iid: str, queue: QueueConfig = CS_IT, priority: int = 0, at: float = T0, channel: int = CHAT
) -> Interaction:
    return Interaction(
        interaction_id=iid,
        version=1,
        status=S.QUEUED,
        channel=channel,
        priority=priority,
        queue_id=queue.queue_id,
        enqueued_at=at,
        queued_since=at,
    )


def agent(
    agent_id: str, idle_since: float = T0, channels: frozenset[int] = frozenset({CHAT, VOICE}), **skills: int
) -> Candidate:
    defaults = {"customer_service": 4, "lang:it": 5}
    return Candidate(
        agent_id, {**defaults, **{k.replace("_it", ":it"): v for k, v in skills.items()}}, channels, idle_since
    )


def one_each(candidate: Candidate, channel: int) -> Candidate | None:
    return None  # each agent takes one interaction in these scenarios


def matches(
    waiting_list: list[Interaction], candidates: list[Candidate], now: float = T0 + 1, queues=QUEUES, **kw
) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    found = plan(waiting_list, queues, {c.agent_id: c for c in candidates}, now, kw.pop("after", one_each), **kw)
    return [(m.interaction_id, m.agent_id) for m in found]


def test_higher_priority_first_then_longest_waiting() -> None:
    items = [waiting("late", at=T0 + 5), waiting("early", at=T0), waiting("vip", priority=5, at=T0 + 9)]
    assert matches(items, [agent("a", T0 - 3), agent("b", T0 - 2), agent("c", T0 - 1)], now=T0 + 10) == [
        ("vip", "a"),
        ("early", "b"),
        ("late", "c"),
    ]


def test_aging_lets_a_long_wait_overtake_higher_priority() -> None:
    old = waiting("old", at=T0)  # waited 6 minutes: 0 + 6 x 1.0
    urgent = waiting("urgent", priority=5, at=T0 + 355)  # waited 5 s: 5 + ~0.08
    assert matches([urgent, old], [agent("a")], now=T0 + 360) == [("old", "a")]


def test_bullseye_widens_with_the_wait() -> None:
    generalist = agent("gen", customer_service=0, lang_it=2)  # no department skill, some Italian
    junior = agent("jun", customer_service=2, lang_it=5)
    item = waiting("x", at=T0)
    assert matches([item], [generalist, junior], now=T0 + 10) == []  # ring 0: customer_service >= 3
    assert matches([item], [generalist], now=T0 + 40) == []  # ring 1 still needs customer_service
    assert matches([item], [junior], now=T0 + 40) == [("x", "jun")]  # ring 1: proficiency >= 1
    assert matches([item], [generalist], now=T0 + 95) == [("x", "gen")]  # ring 2: Italian only


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("longest_idle", "idle"), ("most_skilled", "skilled"), ("least_occupied", "calm"), ("round_robin", "next")],
)
def test_strategies(strategy: str, expected: str) -> None:
    queue = replace(CS_IT, strategy=strategy)
    people = [
        replace(agent("idle", T0 - 600, customer_service=3), occupancy=0.9, last_offer_at=T0 - 5),
        replace(agent("skilled", T0 - 10, customer_service=5), occupancy=0.8, last_offer_at=T0 - 4),
        replace(agent("calm", T0 - 20, customer_service=3), occupancy=0.1, last_offer_at=T0 - 3),
        replace(agent("next", T0 - 30, customer_service=3), occupancy=0.7, last_offer_at=T0 - 60),
    ]
    assert matches([waiting("x", queue)], people, queues={queue.queue_id: queue}) == [("x", expected)]


def test_capacity_is_used_up_within_one_pass() -> None:
    room = {"a": 2}  # two more chats fit

    def after(candidate: Candidate, channel: int) -> Candidate | None:
        room[candidate.agent_id] -= 1
        return candidate if room[candidate.agent_id] else None

    items = [waiting(f"c{n}", at=T0 + n) for n in range(5)]
    assert matches(items, [agent("a")], now=T0 + 10, after=after) == [("c0", "a"), ("c1", "a")]


def test_an_agent_who_declined_is_not_offered_the_same_interaction_again_for_a_while() -> None:
    item = replace(waiting("x"), declined=(("a", T0 + 5),))
    people = [agent("a", T0 - 100), agent("b", T0 - 1)]
    assert matches([item], people, now=T0 + 10) == [("x", "b")]  # a is the longest idle, but declined
    assert matches([item], people[:1], now=T0 + 10) == []
    assert matches([item], people, now=T0 + 40) == [("x", "a")]  # the 30 s cool-down is over


def test_outbound_pacing_limits_work_in_progress() -> None:
    queue = QUEUES["outbound.it"]
    items = [waiting(f"o{n}", queue, at=T0 + n, channel=VOICE) for n in range(4)]
    people = [Candidate(f"a{n}", {"outbound": 3, "lang:it": 5}, frozenset({VOICE}), T0) for n in range(4)]
    found = matches(items, people, now=T0 + 10, in_progress={queue.queue_id: queue.pacing_limit - 2})
    assert [i for i, _ in found] == ["o0", "o1"]


def test_queue_lookup_names_the_wrong_field() -> None:
    assert queue_for(QUEUES.values(), "sales", "pl", INBOUND).queue_id == "sales.pl"
    assert queue_for(QUEUES.values(), "win_back", "it", OUTBOUND).queue_id == "outbound.it"
    with pytest.raises(InvalidField) as error:
        queue_for(QUEUES.values(), "sales", "fr", INBOUND)
    assert error.value.field == "language"
    with pytest.raises(InvalidField) as error:
        queue_for(QUEUES.values(), "astrology", "it", INBOUND)
    assert error.value.field == "department"


# ---- the Interaction aggregate ----

CREATE = CreateInteraction("i1", CHAT, INBOUND, "+39 02 1234567", "it", "customer_service")
OFFER_UNTIL = datetime.fromtimestamp(T0 + 20, UTC)


def run(*steps) -> Interaction:  # type: ignore[no-untyped-def]
    interaction = Interaction(interaction_id="i1")
    for n, step in enumerate(steps):
        for event in step(interaction):
            interaction = domain.apply(interaction, event, T0 + n)
    return interaction


def created(i: Interaction) -> list:  # type: ignore[type-arg]
    return domain.create(CREATE, i, inbound_queue("customer_service", "it"))


def test_one_offer_at_a_time_and_only_to_its_agent() -> None:
    offered = run(created, lambda i: domain.offer(i, "anna", OFFER_UNTIL, 0))
    assert (offered.status, offered.agent_id) == (S.OFFERED, "anna")
    with pytest.raises(PreconditionFailed) as twice:
        domain.offer(offered, "marek", OFFER_UNTIL, 0)
    assert twice.value.details == {"current-state": "OFFERED"}
    with pytest.raises(PreconditionFailed, match="with anna, not marek"):
        domain.accept(offered, "marek")


def test_an_ended_offer_keeps_the_original_enqueue_time() -> None:
    back = run(
        created, lambda i: domain.offer(i, "anna", OFFER_UNTIL, 0), lambda i: domain.end_offer(i, "anna", "timed_out")
    )
    assert (back.status, back.enqueued_at, back.queued_since, back.requeues) == (S.QUEUED, T0, T0 + 2, 1)


def test_full_life_and_illegal_steps() -> None:
    done = run(
        created,
        lambda i: domain.offer(i, "anna", OFFER_UNTIL, 0),
        lambda i: domain.accept(i, "anna"),
        lambda i: domain.end(i, "anna"),
        lambda i: domain.complete(i, "anna", "billing", "resolved"),
    )
    assert (done.status, done.answered_at, done.closed_at) == (S.COMPLETED, T0 + 2, T0 + 4)
    for step in (lambda i: domain.abandon(i, "x"), lambda i: domain.cancel(i, "x"), lambda i: domain.accept(i, "anna")):
        with pytest.raises(PreconditionFailed):
            step(done)
    with pytest.raises(InvalidField) as missing:
        domain.complete(done, "anna", "", "")
    assert missing.value.field == "wrap_up_code"


def test_a_step_the_agent_already_took_is_a_no_op_for_that_agent_only() -> None:
    """A desktop retries when a reply is lost (a router crash between the write and the
    reply): the repeat changes nothing and is not an error.  Anyone else is refused."""
    offer = lambda i: domain.offer(i, "anna", OFFER_UNTIL, 0)  # noqa: E731
    connected = run(created, offer, lambda i: domain.accept(i, "anna"))
    assert domain.accept(connected, "anna") == []
    with pytest.raises(PreconditionFailed):
        domain.accept(connected, "marek")
    wrapping = run(created, offer, lambda i: domain.accept(i, "anna"), lambda i: domain.end(i, "anna"))
    assert domain.end(wrapping, "anna") == []
    with pytest.raises(PreconditionFailed):
        domain.accept(wrapping, "anna")  # a step back is still refused
    done = run(
        created,
        offer,
        lambda i: domain.accept(i, "anna"),
        lambda i: domain.end(i, "anna"),
        lambda i: domain.complete(i, "anna", "billing", "resolved"),
    )
    assert domain.complete(done, "anna", "billing", "resolved") == []
    with pytest.raises(PreconditionFailed):
        domain.complete(done, "marek", "billing", "resolved")


def test_creating_twice_with_the_same_id_is_a_no_op() -> None:
    assert created(run(created)) == []


# ---- KPIs ----


def closed(iid: str, wait: float, answered: bool) -> Interaction:
    base = waiting(iid)
    if answered:
        return replace(base, status=S.COMPLETED, answered_at=T0 + wait, closed_at=T0 + wait + 60)
    return replace(base, status=S.ABANDONED, closed_at=T0 + wait)


HISTORY = [
    closed("fast", 10, True),
    closed("slow", 40, True),
    closed("gave-up", 30, False),
    closed("short", 2, False),  # under the 5 s short-abandon threshold
    waiting("now", at=T0 + 100),
]


@pytest.mark.parametrize(
    ("variant", "service_level"),
    [("answered", 1 / 2), ("answered_and_abandoned", 1 / 3), ("left_queue", 2 / 4)],
)
def test_service_level_variants(variant: str, service_level: float) -> None:
    kpis = queue_kpis(HISTORY, CS_IT, T0 + 130, variant)
    assert kpis.service_level == pytest.approx(service_level)
    assert (kpis.offered, kpis.answered, kpis.abandoned, kpis.waiting) == (5, 2, 1, 1)
    assert kpis.average_speed_of_answer_s == 25
    assert kpis.abandonment_rate == pytest.approx(1 / 4)  # the short abandon leaves both sides
    assert kpis.longest_wait_s == 30


def at_times(*steps: tuple[float, object]) -> Interaction:
    """Like run, each step at its own time (seconds after T0)."""
    interaction = Interaction(interaction_id="i1")
    for seconds, step in steps:
        for event in step(interaction):  # type: ignore[operator]
            interaction = domain.apply(interaction, event, T0 + seconds)
    return interaction


def test_a_transferred_interaction_counts_in_each_queue_it_visited() -> None:
    """Before, a transfer took the interaction out of the first queue's figures: that
    queue's offered and answered went down the moment an agent passed a customer on."""
    support = QUEUES["technical_support.it"]

    def offered_to_anna(i: Interaction) -> list:  # type: ignore[type-arg]
        return domain.offer(i, "anna", OFFER_UNTIL, 0)

    def accepted_by_anna(i: Interaction) -> list:  # type: ignore[type-arg]
        return domain.accept(i, "anna")

    def to_support(i: Interaction) -> list:  # type: ignore[type-arg]
        return domain.transfer(i, "anna", support, "", warm=False)

    moved = at_times(
        (0, created),
        (4, offered_to_anna),
        (10, accepted_by_anna),
        (100, to_support),
        (130, lambda i: domain.offer(i, "marek", OFFER_UNTIL, 0)),
        (160, lambda i: domain.accept(i, "marek")),
    )
    first = queue_kpis([*HISTORY, moved], CS_IT, T0 + 200, "answered")
    assert (first.offered, first.answered, first.waiting) == (6, 3, 1)
    assert first.average_speed_of_answer_s == pytest.approx((10 + 40 + 10) / 3)
    assert first.service_level == pytest.approx(2 / 3)
    second = queue_kpis([*HISTORY, moved], support, T0 + 200, "answered")
    assert (second.offered, second.answered, second.waiting) == (1, 1, 0)
    assert second.average_speed_of_answer_s == 60  # waited there from the transfer

    still_waiting = at_times(*[(0, created), (4, offered_to_anna), (10, accepted_by_anna), (100, to_support)])
    there = queue_kpis([still_waiting], support, T0 + 200, "answered")
    assert (there.offered, there.waiting, there.answered, there.longest_wait_s) == (1, 1, 0, 100)


# ---- running tallies: the figures without keeping the interactions ----


def tallied(
    changes: Iterable[tuple[Interaction | None, Interaction | None]], now: float, tz: str = "UTC"
) -> DayTallies:
    tallies = DayTallies(QUEUES, ZoneInfo(tz))
    for before, after in changes:
        tallies.count(before, after, now)
    return tallies


def test_tallies_give_the_figures_of_the_interactions_themselves() -> None:
    for variant in SL_VARIANTS:
        _, tally = tallied([(None, i) for i in HISTORY], T0 + 130).today(CS_IT.queue_id, T0 + 130)
        waiting_now = [i for i in HISTORY if is_waiting(i, CS_IT.queue_id)]
        assert kpis(CS_IT, tally, waiting_now, T0 + 130, variant) == queue_kpis(HISTORY, CS_IT, T0 + 130, variant)


def test_taking_back_each_earlier_state_leaves_the_figures_of_the_last() -> None:
    """The router counts every change as (before, after): a transferred interaction's
    states one after another must leave exactly what its final state adds, in both queues."""
    support = QUEUES["technical_support.it"]
    steps: list[tuple[float, object]] = [
        (0, created),
        (4, lambda i: domain.offer(i, "anna", OFFER_UNTIL, 0)),
        (6, lambda i: domain.end_offer(i, "anna", "rejected")),
        (8, lambda i: domain.offer(i, "anna", OFFER_UNTIL, 0)),
        (10, lambda i: domain.accept(i, "anna")),
        (100, lambda i: domain.transfer(i, "anna", support, "", warm=False)),
        (130, lambda i: domain.offer(i, "marek", OFFER_UNTIL, 0)),
        (160, lambda i: domain.accept(i, "marek")),
        (200, lambda i: domain.end(i, "marek")),
    ]
    states = [at_times(*steps[:n]) for n in range(1, len(steps) + 1)]
    changes = [(None, states[0]), *pairwise(states)]
    tallies = tallied([*((None, i) for i in HISTORY), *changes], T0 + 300)
    everything = [*HISTORY, states[-1]]
    for queue in (CS_IT, support):
        _, tally = tallies.today(queue.queue_id, T0 + 300)
        waiting_now = [i for i in everything if is_waiting(i, queue.queue_id)]
        expected = queue_kpis(everything, queue, T0 + 300, "answered")
        assert kpis(queue, tally, waiting_now, T0 + 300, "answered") == expected
        assert expected.offered == (6 if queue is CS_IT else 1)  # both visits count


def test_a_new_day_starts_from_zero_and_yesterday_is_never_taken_back() -> None:
    rome = "Europe/Rome"
    midnight = datetime(2027, 1, 16, tzinfo=ZoneInfo(rome)).timestamp()
    late = waiting("late", at=midnight - 10)
    answered = replace(late, status=S.CONNECTED, answered_at=midnight + 10)
    tallies = tallied([(None, late)], midnight - 5, rome)
    assert tallies.today(CS_IT.queue_id, midnight - 5)[1].offered == 1
    tallies.count(late, answered, midnight + 10)  # answered after midnight: still the day before's contact
    day, tally = tallies.today(CS_IT.queue_id, midnight + 10)
    assert (day.isoformat(), tally) == ("2027-01-16", Tally())
    early = waiting("early", at=midnight + 20)
    tallies.count(None, early, midnight + 20)
    assert tallies.today(CS_IT.queue_id, midnight + 30)[1] == Tally(offered=1)


STEPS: dict[str, Callable[[Interaction], list[Any]]] = {
    "offer": lambda i: domain.offer(i, "anna", OFFER_UNTIL, 0),
    "reject": lambda i: domain.end_offer(i, "anna", "rejected"),
    "accept": lambda i: domain.accept(i, "anna"),
    "end": lambda i: domain.end(i, "anna"),
    "complete": lambda i: domain.complete(i, "anna", "billing", "resolved"),
    "transfer": lambda i: domain.transfer(i, "anna", QUEUES["technical_support.it"], "", warm=False),
    "escalate": lambda i: domain.transfer(i, "anna", QUEUES["sales.it"], "", warm=False, escalated=True),
    "abandon": lambda i: domain.abandon(i, "hung up"),
    "cancel": lambda i: domain.cancel(i, "withdrawn"),
}
LIVES = st.lists(
    st.lists(
        st.tuples(st.sampled_from(sorted(STEPS)), st.sampled_from([0.0, 2.5, 5.0, 15.0, 20.0, 30.0])), max_size=12
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(LIVES, st.sampled_from(SL_VARIANTS))
def test_tallies_of_every_change_equal_the_walk_over_the_final_states(lives: list[Any], variant: str) -> None:
    """Any lives (steps the domain refuses are skipped), counted change by change as the
    router does, give the figures of walking the final states, in every queue they visited."""
    changes: list[tuple[Interaction | None, Interaction | None]] = []
    finals = []
    for n, steps in enumerate(lives):
        at, current = T0, Interaction(interaction_id=f"i{n}")
        for step, gap in [("create", 0.0), *steps]:
            decide = STEPS.get(step, created)
            try:
                events = decide(current)
            except (PreconditionFailed, InvalidField):
                continue
            at += gap
            before = current
            for event in events:
                current = domain.apply(current, event, at)
            changes.append((before if before.exists else None, current))
        finals.append(current)
    now = T0 + 2000
    tallies = tallied(changes, now)
    for queue in (CS_IT, QUEUES["technical_support.it"], QUEUES["sales.it"]):
        walked = queue_kpis(finals, queue, now, variant)
        _, tally = tallies.today(queue.queue_id, now)
        counted = kpis(queue, tally, [i for i in finals if is_waiting(i, queue.queue_id)], now, variant)
        assert replace(counted, average_speed_of_answer_s=0.0, service_level=0.0, abandonment_rate=0.0) == replace(
            walked, average_speed_of_answer_s=0.0, service_level=0.0, abandonment_rate=0.0
        )
        assert counted.average_speed_of_answer_s == pytest.approx(walked.average_speed_of_answer_s, abs=1e-6)
        assert counted.service_level == pytest.approx(walked.service_level)
        assert counted.abandonment_rate == pytest.approx(walked.abandonment_rate)
