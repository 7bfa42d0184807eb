"""Agent state, counters, adherence, teams and WatchTeam through the real stack.

Every command goes over gRPC to the agents server; every read comes from the
MongoDB read model that the Faust worker projected from Kafka.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1.agents_pb2 import AgentState as S
from centralino.v1.agents_pb2 import Transition as T
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaProducer
from opentelemetry.sdk.trace import TracerProvider

from services.agents.adapters import AgentDocument, TeamDocument
from services.agents.events import AGENT, REGISTRY, team_stream
from services.agents.rebuild import rebuild
from services.agents.watch import TeamWatchHub
from services.kernel.dead_letters import dead_letter_topic
from services.kernel.envelope import Metadata, wrap
from services.kernel.eventstore import EventStore, StoredEvent
from services.kernel.kafka import Record, ensure_topics, make_producer
from services.kernel.outbox import to_record
from services.kernel.repository import Repository
from tests.helpers import event_log, eventually, read_topic
from tests.integration.conftest import AgentsService

pytestmark = pytest.mark.integration

DAY = datetime(2026, 11, 2, tzinfo=UTC)


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def at(hh: int, mm: int, ss: int = 0) -> Timestamp:
    return ts(DAY + timedelta(hours=hh, minutes=mm, seconds=ss))


def projected_version(agent_id: str, version: int) -> bool:
    document = AgentDocument.objects(agent_id=agent_id).only("version").first()
    return bool(document and document.version >= version)


@pytest.fixture(scope="module")
def service(agents: AgentsService) -> AgentsService:
    agents.create_team("t-milano", supervisor_id="sup-rossi")
    return agents


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value


# ---- the state machine over gRPC ------------------------------------------------------

PATHS: dict[str, list[tuple[int, dict[str, Any]]]] = {
    "LOGGED_OUT": [],
    "NOT_READY": [(T.LOG_IN, {})],
    "READY": [(T.LOG_IN, {}), (T.GO_READY, {})],
    "RESERVED": [(T.LOG_IN, {}), (T.GO_READY, {}), (T.RESERVE, {"interaction_id": "i1", "channel": pb.VOICE})],
    "BUSY": [
        (T.LOG_IN, {}),
        (T.GO_READY, {}),
        (T.RESERVE, {"interaction_id": "i1", "channel": pb.VOICE}),
        (T.CONNECT, {"interaction_id": "i1"}),
    ],
    "AFTER_CALL_WORK": [
        (T.LOG_IN, {}),
        (T.GO_READY, {}),
        (T.RESERVE, {"interaction_id": "i1", "channel": pb.VOICE}),
        (T.CONNECT, {"interaction_id": "i1"}),
        (T.END, {"interaction_id": "i1"}),
    ],
}
LEGAL: dict[str, dict[int, int]] = {
    "LOGGED_OUT": {T.LOG_IN: S.NOT_READY},
    "NOT_READY": {T.GO_READY: S.READY, T.GO_NOT_READY: S.NOT_READY, T.LOG_OUT: S.LOGGED_OUT},
    "READY": {T.GO_NOT_READY: S.NOT_READY, T.LOG_OUT: S.LOGGED_OUT, T.RESERVE: S.RESERVED},
    "RESERVED": {T.CONNECT: S.BUSY, T.REJECT_OFFER: S.READY, T.MISS_OFFER: S.NOT_READY, T.GO_NOT_READY: S.RESERVED},
    "BUSY": {T.HOLD: S.BUSY, T.END: S.AFTER_CALL_WORK, T.GO_NOT_READY: S.BUSY},
    "AFTER_CALL_WORK": {T.COMPLETE_WRAP_UP: S.READY, T.GO_NOT_READY: S.AFTER_CALL_WORK},
}
ARGS: dict[int, dict[str, Any]] = {
    T.GO_NOT_READY: {"reason": pb.MEETING},
    T.RESERVE: {"interaction_id": "i9", "channel": pb.VOICE},
    **{t: {"interaction_id": "i1"} for t in (T.REJECT_OFFER, T.MISS_OFFER, T.CONNECT, T.HOLD, T.RESUME, T.END)},
    T.COMPLETE_WRAP_UP: {"interaction_id": "i1", "wrap_up_code": "resolved"},
}


def test_every_transition_from_every_state(service: AgentsService) -> None:
    expected_views: dict[str, int] = {}
    for state, path in PATHS.items():
        for transition in [t for t in T.values() if t]:
            agent_id = f"sm-{state.lower()}-{T.Name(transition).lower()}".replace("_", "-")
            service.register(agent_id, team_id="t-milano", override_span_of_control=True)
            for step, fields in path:
                service.change(agent_id, step, **fields)
            outcome = LEGAL[state].get(transition)
            if outcome is None:
                error = rpc_error(service.change, agent_id, transition, **ARGS.get(transition, {}))
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (state, T.Name(transition))
                assert ("current-state", state) in tuple(error.trailing_metadata()), error.details()
                expected_views[agent_id] = S.Value(state)
            else:
                reply = service.change(agent_id, transition, **ARGS.get(transition, {}))
                assert reply.state == outcome, (state, T.Name(transition))
                expected_views[agent_id] = outcome

    def all_projected() -> bool:
        views = {d.agent_id: d.state for d in AgentDocument.objects(agent_id__in=list(expected_views)).only("state")}
        return views == expected_views

    eventually(all_projected)


def test_unknown_agents_and_bad_fields_get_clear_statuses(service: AgentsService) -> None:
    assert rpc_error(service.change, "nobody", T.LOG_IN).code() == grpc.StatusCode.NOT_FOUND
    service.register("bad-fields", team_id="t-milano", override_span_of_control=True)
    error = rpc_error(service.change, "bad-fields", T.GO_NOT_READY, reason=pb.MISSED_OFFER)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and ("field", "reason") in tuple(error.trailing_metadata())
    error = rpc_error(service.change, "bad-fields", T.LOG_IN, at=ts(datetime.now(UTC) + timedelta(hours=1)))
    assert ("field", "at") in tuple(error.trailing_metadata())
    assert rpc_error(service.stub.GetAgentState, pb.GetAgentRequest(agent_id="bad-fields", day="2-11-2026")).code() == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_a_registration_that_stopped_halfway_is_finished_by_a_retry(service: AgentsService) -> None:
    """Registering is two writes (the agent, then its team): a crash in between left an
    agent its team did not list, and the client's retry got ALREADY_EXISTS for ever."""
    service.create_team("t-halfway")
    store = EventStore(log_name="a-crashed-process")
    agents = Repository(store, REGISTRY, service.settings.topic("agents"), AGENT)
    meta = Metadata(correlation_id="c", causation_id="c", producer="a crashed process")
    registered = pb.AgentRegistered(agent_id="halfway", name="Anna Rossi", team_id="t-halfway", seniority=pb.CONSULTANT)
    with TracerProvider().get_tracer("test").start_as_current_span("the request that crashed"):
        [first] = agents.save("halfway", 0, [registered], meta)  # the agent's write, and then the crash
    unpublished, position = store.unpublished(10)  # published, as the crashed process's restart would
    make_producer(service.settings.kafka_bootstrap, "test").send_all([to_record(e) for e in unpublished], 30)
    store.mark_published(position, force=True)

    retried = service.register("halfway", team_id="t-halfway")
    assert (retried.version, retried.event_id) == (1, first.event_id)  # answered as the first time
    joined = [e.agent_id for t, e in event_log(team_stream("t-halfway"), REGISTRY) if t == "agents.TeamMemberJoined"]
    assert joined == ["halfway"]
    assert rpc_error(service.register, "halfway", team_id="t-halfway").code() == grpc.StatusCode.ALREADY_EXISTS


# ---- a scripted shift: exact counters and adherence ---------------------------------------


def test_counters_and_adherence_after_a_scripted_shift(service: AgentsService) -> None:
    agent = "giulia.bianchi"
    service.register(agent, team_id="t-milano", override_span_of_control=True)
    activities = [
        pb.PlannedActivity(start=at(8, 0), end=at(9, 0), productive=True),
        pb.PlannedActivity(start=at(9, 0), end=at(9, 15), reason=pb.BREAK),
        pb.PlannedActivity(start=at(9, 15), end=at(10, 0), productive=True),
    ]
    service.stub.ScheduleShift(
        pb.ScheduleShiftRequest(
            agent_id=agent,
            shift_id="2026-11-02-early",
            shift_manager_id="sm-1",
            start=at(8, 0),
            end=at(10, 0),
            activities=activities,
        )
    )
    script: list[tuple[Timestamp, int, dict[str, Any]]] = [
        (at(8, 2), T.LOG_IN, {}),
        (at(8, 3), T.GO_READY, {}),
        (at(8, 10), T.RESERVE, {"interaction_id": "call-1", "channel": pb.VOICE}),
        (at(8, 10, 10), T.CONNECT, {"interaction_id": "call-1"}),
        (at(8, 12, 40), T.HOLD, {"interaction_id": "call-1"}),
        (at(8, 13, 40), T.RESUME, {"interaction_id": "call-1"}),
        (at(8, 16, 10), T.END, {"interaction_id": "call-1"}),
        (at(8, 18, 10), T.COMPLETE_WRAP_UP, {"interaction_id": "call-1", "wrap_up_code": "resolved"}),
        (at(8, 30), T.RESERVE, {"interaction_id": "call-2", "channel": pb.VOICE}),
        (at(8, 30, 10), T.CONNECT, {"interaction_id": "call-2"}),
        (at(8, 33, 30), T.END, {"interaction_id": "call-2"}),
        (at(8, 34, 10), T.COMPLETE_WRAP_UP, {"interaction_id": "call-2", "wrap_up_code": "sale"}),
        (at(9, 5), T.GO_NOT_READY, {"reason": pb.BREAK}),
        (at(9, 20), T.GO_READY, {}),
        (at(9, 50), T.LOG_OUT, {}),
    ]
    for when, transition, fields in script:
        reply = service.change(agent, transition, at=when, **fields)
    eventually(lambda: projected_version(agent, reply.version))

    too_old = rpc_error(service.stub.GetAgentState, pb.GetAgentRequest(agent_id=agent, day="2026-08-01"))
    assert too_old.code() == grpc.StatusCode.INVALID_ARGUMENT and ("field", "day") in too_old.trailing_metadata()
    assert "kept for 92 days: from 2026-08-02" in (too_old.details() or "")
    view = service.stub.GetAgentState(pb.GetAgentRequest(agent_id=agent, day="2026-11-02"))
    c = view.today
    assert (view.state, c.day, c.handled) == (S.LOGGED_OUT, "2026-11-02", 2)
    assert (c.talk_s, c.hold_s, c.after_call_work_s) == (500, 60, 160)
    assert (c.reserved_s, c.busy_s, c.after_call_work_wall_s) == (20, 560, 160)
    assert c.ready_s == 420 + 710 + 1850 + 1800
    assert dict(c.not_ready_s) == {"UNSPECIFIED": 60, "BREAK": 900}
    assert c.occupancy == pytest.approx(740 / (740 + 4780))
    assert c.average_handle_time_s == 360
    [adherence] = view.adherence
    out = 180 + 300 + 300 + 600  # late login, working into the break, late back, left early
    assert (adherence.shift_id, adherence.scheduled_s, adherence.out_of_adherence_s) == (
        "2026-11-02-early",
        7200,
        out,
    )
    assert adherence.adherence == pytest.approx((7200 - out) / 7200)


# ---- queries -------------------------------------------------------------------------------


def test_list_agents_filters_and_team_stats(service: AgentsService) -> None:
    service.create_team("t-warsaw", supervisor_id="sup-nowak")
    chats = [
        pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=2),
        pb.ChannelCapacity(channel=pb.VOICE, max_concurrent=1),
    ]
    service.register("w-marek", team_id="t-warsaw", skills=[pb.Skill(name="lang:pl", proficiency=5)], channels=chats)
    service.register("w-ewa", team_id="t-warsaw", skills=[pb.Skill(name="lang:pl", proficiency=2)], channels=chats)
    service.register("w-piotr", team_id="t-warsaw", skills=[pb.Skill(name="fraud", proficiency=4)])
    for agent in ("w-marek", "w-ewa"):
        service.change(agent, T.LOG_IN)
        service.change(agent, T.GO_READY)
    service.change("w-marek", T.RESERVE, interaction_id="chat-1", channel=pb.CHAT)
    last = service.change("w-marek", T.CONNECT, interaction_id="chat-1")
    eventually(lambda: projected_version("w-marek", last.version))

    def ids(**query: Any) -> list[str]:
        return [a.agent_id for a in service.stub.ListAgents(pb.ListAgentsRequest(**query)).agents]

    assert ids(team_id="t-warsaw") == ["w-ewa", "w-marek", "w-piotr"]
    assert ids(team_id="t-warsaw", skill="lang:pl", min_proficiency=4) == ["w-marek"]
    assert ids(team_id="t-warsaw", state=S.BUSY) == ["w-marek"]
    assert ids(team_id="t-warsaw", available_on=pb.CHAT) == ["w-ewa", "w-marek"]  # marek has a second chat slot
    assert ids(team_id="t-warsaw", available_on=pb.VOICE) == ["w-ewa"]  # never a call on top of a chat

    [marek] = [
        a for a in service.stub.ListAgents(pb.ListAgentsRequest(team_id="t-warsaw")).agents if a.agent_id == "w-marek"
    ]
    assert [(w.interaction_id, w.phase) for w in marek.work] == [("chat-1", "connected")]
    assert [(c.channel, c.in_use, c.max_concurrent) for c in marek.channels] == [(pb.CHAT, 1, 2), (pb.VOICE, 0, 1)]

    eventually(lambda: TeamDocument.objects(team_id="t-warsaw", members__size=3).first())
    stats = service.stub.GetTeamStats(pb.GetTeamStatsRequest(team_id="t-warsaw"))
    assert stats.supervisor_id == "sup-nowak"
    assert dict(stats.agents_by_state) == {"BUSY": 1, "READY": 1, "LOGGED_OUT": 1}
    assert 0 < stats.occupancy <= 1


def test_span_of_control_is_enforced_unless_overridden(service: AgentsService) -> None:
    service.create_team("t-span")
    for n in range(9):
        service.register(f"span-{n}", team_id="t-span")
    error = rpc_error(
        service.stub.AssignTeamLeader, pb.AssignTeamLeaderRequest(team_id="t-span", team_leader_id="tl-1")
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "10-16" in error.details()
    for n in range(9, 16):
        service.register(f"span-{n}", team_id="t-span")
    assert (
        service.stub.AssignTeamLeader(pb.AssignTeamLeaderRequest(team_id="t-span", team_leader_id="tl-1")).members == 16
    )
    error = rpc_error(service.register, "span-16", team_id="t-span")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "17 agents" in error.details()
    service.register("span-16", team_id="t-span", override_span_of_control=True)
    service.create_team("t-small")
    moved = service.stub.MoveAgent(pb.MoveAgentRequest(agent_id="span-16", team_id="t-small"))
    assert moved.members == 1
    eventually(lambda: AgentDocument.objects(agent_id="span-16", team_id="t-small").first())


# ---- WatchTeam ------------------------------------------------------------------------------


def test_watch_team_delivers_every_change_in_order(service: AgentsService) -> None:
    service.create_team("t-watch")
    service.register("watch-1", team_id="t-watch")
    service.register("watch-2", team_id="t-watch")
    stream = service.stub.WatchTeam(pb.WatchTeamRequest(team_id="t-watch"), timeout=60)
    assert ("subscribed", "t-watch") in tuple(stream.initial_metadata())  # live from here on
    received: list[pb.AgentStateChange] = []

    def read(count: int) -> None:
        for change in stream:
            received.append(change)
            if len(received) == count:
                return

    steps: list[tuple[str, int, dict[str, Any]]] = [
        ("watch-1", T.LOG_IN, {}),
        ("watch-2", T.LOG_IN, {}),
        ("watch-1", T.GO_READY, {}),
        ("watch-1", T.RESERVE, {"interaction_id": "w-call", "channel": pb.VOICE}),
        ("watch-2", T.GO_NOT_READY, {"reason": pb.COACHING}),
        ("watch-1", T.CONNECT, {"interaction_id": "w-call"}),
        ("watch-1", T.END, {"interaction_id": "w-call"}),
    ]
    reader = threading.Thread(target=read, args=(len(steps),))
    reader.start()
    for agent_id, transition, fields in steps:
        service.change(agent_id, transition, **fields)
    reader.join(timeout=30)
    stream.cancel()
    assert len(received) == len(steps)
    states_after = [S.NOT_READY, S.NOT_READY, S.READY, S.RESERVED, S.NOT_READY, S.BUSY, S.AFTER_CALL_WORK]
    for agent_id in ("watch-1", "watch-2"):
        expected = [(t, state) for (a, t, _), state in zip(steps, states_after, strict=True) if a == agent_id]
        assert [(c.transition, c.state) for c in received if c.agent_id == agent_id] == expected
        versions = [c.version for c in received if c.agent_id == agent_id]
        assert versions == sorted(versions)
    [coaching] = [c for c in received if c.transition == T.GO_NOT_READY]
    assert (coaching.agent_id, coaching.reason) == ("watch-2", pb.COACHING)


def test_watch_team_reads_past_a_record_it_cannot_read(service: AgentsService) -> None:
    """Before, an unreadable record made the hub reconnect at the topic's end two seconds
    later, and every change in between was lost to every watcher."""
    service.create_team("t-watch-odd")
    service.register("watch-odd", team_id="t-watch-odd")
    stream = service.stub.WatchTeam(pb.WatchTeamRequest(team_id="t-watch-odd"), timeout=15)
    stream.initial_metadata()
    not_an_envelope(service, key=b"watch-odd")  # the agent's partition, ahead of its next change

    service.change("watch-odd", T.LOG_IN)

    change = next(iter(stream))
    stream.cancel()
    assert (change.agent_id, change.transition) == ("watch-odd", T.LOG_IN)


def test_the_team_watch_goes_on_from_where_it_was_after_losing_kafka(service: AgentsService) -> None:
    """Before, the hub reconnected at the topic's end, and the changes made while it was
    away never reached the streams that stayed open."""
    topic = service.settings.topic(f"watch-{uuid.uuid4().hex[:8]}")
    bootstrap = service.settings.kafka_bootstrap
    ensure_topics(bootstrap, [topic])
    hub = TeamWatchHub(bootstrap, topic)
    failures = iter([ConnectionError("broker gone")])  # the first delivery fails, as an outage would
    deliver = hub._deliver

    def flaky(record: Any) -> None:
        if (failure := next(failures, None)) is not None:
            raise failure
        deliver(record)

    hub._deliver = flaky  # type: ignore[method-assign]
    hub.start()
    try:
        assert hub.wait_ready(30)
        watching = hub.subscribe("t-away")
        producer = make_producer(bootstrap, "test")
        producer.send_all([state_change(topic, "away-1", 1, T.LOG_IN)], timeout_s=30)  # fails, then retried
        time.sleep(0.5)  # the hub is away now, for 2 s
        producer.send_all([state_change(topic, "away-1", 2, T.GO_READY)], timeout_s=30)
        received = [watching.get(timeout=15) for _ in range(2)]
        assert [(c.agent_id, c.transition, c.version) for c in received] == [
            ("away-1", T.LOG_IN, 1),
            ("away-1", T.GO_READY, 2),
        ]
    finally:
        hub.stop()


def state_change(topic: str, agent_id: str, sequence: int, transition: int) -> Record:
    event = pb.AgentStateChanged(agent_id=agent_id, team_id="t-away", transition=transition)  # type: ignore[arg-type]
    meta = Metadata(correlation_id="c", causation_id="c", producer="test")
    envelope = wrap(event, registry=REGISTRY, aggregate_type=AGENT, aggregate_id=agent_id, sequence=sequence, meta=meta)
    return topic, agent_id.encode(), envelope.SerializeToString(), []


def test_records_the_projection_cannot_read_are_parked_as_dead_letters(service: AgentsService) -> None:
    """Skipped, so the projection goes on; kept, unchanged, with where they came from and why."""
    topic = service.settings.topic("agents")
    not_an_envelope(service, key=b"dead-1")
    meta = Metadata(correlation_id="c", causation_id="c", producer="a newer release")
    future = wrap(
        pb.AgentRegistered(agent_id="dead-2"),
        registry=REGISTRY,
        aggregate_type=AGENT,
        aggregate_id="dead-2",
        sequence=1,
        meta=meta,
    )
    future.event_type = "agents.AgentCloned"  # a type this release does not know
    make_producer(service.settings.kafka_bootstrap, "test").send_all(
        [(topic, b"dead-2", future.SerializeToString(), [("traceparent", b"kept")])], timeout_s=30
    )

    def both(records: list[Any]) -> bool:
        return {b"dead-1", b"dead-2"} <= {r.key for r in records}

    parked = read_topic(service.settings.kafka_bootstrap, dead_letter_topic(topic), 0, timeout_s=60, until=both)
    found = {r.key: (r.value, dict(r.headers)) for r in parked if r.key in (b"dead-1", b"dead-2")}
    assert set(found) == {b"dead-1", b"dead-2"}, [r.key for r in parked]
    (value_1, headers_1), (value_2, headers_2) = found[b"dead-1"], found[b"dead-2"]
    assert value_1 == b"\xff\xfe not an envelope" and value_2 == future.SerializeToString()
    assert headers_1["centralino.dead_letter.reason"] == b"not an event envelope"
    assert headers_2["centralino.dead_letter.reason"] == b"unknown event type agents.AgentCloned"
    assert headers_2["traceparent"] == b"kept"  # the record's own headers stay
    for headers in (headers_1, headers_2):
        assert headers["centralino.dead_letter.topic"] == topic.encode()
        assert headers["centralino.dead_letter.group"] == service.settings.consumer_group("agents-projections").encode()
        assert int(headers["centralino.dead_letter.offset"]) >= 0


def not_an_envelope(service: AgentsService, key: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=service.settings.kafka_bootstrap, acks="all")
    try:
        producer.send(service.settings.topic("agents"), key=key, value=b"\xff\xfe not an envelope")
        producer.flush(timeout=10)
    finally:
        producer.close()


# ---- rebuild ---------------------------------------------------------------------------------


def test_dropping_the_read_model_and_replaying_gives_the_same_documents(service: AgentsService) -> None:
    # A record that is not an envelope, among the agents' events, must not stop the replay.
    service.register("replay-odd", team_id="t-milano", override_span_of_control=True)
    not_an_envelope(service, key=b"replay-odd")
    service.change("replay-odd", T.LOG_IN)

    def snapshot() -> dict[str, dict[str, Any]]:
        docs = {d.agent_id: d.to_mongo().to_dict() for d in AgentDocument.objects.order_by("agent_id")}
        for doc in docs.values():
            doc.pop("projected_at", None)
        return docs

    def settled() -> dict[str, dict[str, Any]] | None:
        # Caught up: a document for every agent, each at its agent's last event (the worker folds in batches).
        docs = snapshot()
        store = EventStore()
        stored = StoredEvent.objects(topic=service.settings.topic("agents")).distinct("aggregate_id")
        agents = {aggregate for aggregate in stored if not aggregate.startswith(team_stream(""))}
        caught_up = set(docs) == agents and all(doc["version"] == len(store.load(a)) for a, doc in docs.items())
        return docs if caught_up else None

    before = eventually(settled)
    teams_before = [t.to_mongo().to_dict() for t in TeamDocument.objects.order_by("team_id")]
    service.worker.stop()
    rebuild(service.settings)
    assert AgentDocument.objects.count() == 0
    service.restart_worker()
    try:
        eventually(lambda: snapshot() == before, timeout_s=90)
    except AssertionError:
        after = snapshot()
        differs = {
            agent_id: {
                field: (doc.get(field), after.get(agent_id, {}).get(field))
                for field in set(doc) | set(after.get(agent_id, {}))
                if doc.get(field) != after.get(agent_id, {}).get(field)
            }
            for agent_id, doc in before.items()
            if doc != after.get(agent_id)
        }
        raise AssertionError(f"the replayed read model differs (before, after): {differs}") from None
    assert [t.to_mongo().to_dict() for t in TeamDocument.objects.order_by("team_id")] == teams_before


def test_concurrent_changes_to_one_agent_all_land_within_capacity(service: AgentsService) -> None:
    service.register(
        "busy-bee",
        team_id="t-milano",
        override_span_of_control=True,
        channels=[pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=3)],
    )
    service.change("busy-bee", T.LOG_IN)
    service.change("busy-bee", T.GO_READY)
    outcomes: list[str] = []

    def reserve(n: int) -> None:
        try:
            service.change("busy-bee", T.RESERVE, interaction_id=f"chat-{n}", channel=pb.CHAT)
            outcomes.append("ok")
        except grpc.RpcError as error:
            outcomes.append(error.code().name)

    threads = [threading.Thread(target=reserve, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Lost races are decided again on fresh state (no ABORTED), and capacity holds.
    assert sorted(outcomes) == ["FAILED_PRECONDITION", "FAILED_PRECONDITION", "ok", "ok", "ok"]


def test_a_batch_of_changes_applies_in_order_and_refusals_stand_alone(service: AgentsService) -> None:
    service.register(
        "batch-ben",
        team_id="t-milano",
        override_span_of_control=True,
        channels=[pb.ChannelCapacity(channel=pb.CHAT, max_concurrent=1)],
    )

    def change(transition: int, **fields: Any) -> pb.ChangeStateRequest:
        return pb.ChangeStateRequest(agent_id="batch-ben", transition=transition, **fields)  # type: ignore[arg-type]

    reply = service.stub.ChangeStates(
        pb.ChangeStatesRequest(
            changes=[
                change(T.LOG_IN),
                change(T.GO_READY),
                change(T.RESERVE, interaction_id="c-1", channel=pb.CHAT),
                change(T.RESERVE, interaction_id="c-2", channel=pb.CHAT),  # over capacity: refused alone
                change(T.CONNECT, interaction_id="c-1"),
                change(T.CONNECT, interaction_id="nope"),  # never reserved
            ]
        )
    )
    outcomes = [r.accepted.state if r.HasField("accepted") else r.refused_code for r in reply.results]
    assert outcomes == [S.NOT_READY, S.READY, S.RESERVED, "FAILED_PRECONDITION", S.BUSY, "FAILED_PRECONDITION"]
    assert [r.accepted.version for r in reply.results if r.HasField("accepted")] == [2, 3, 4, 5]
    assert "capacity" in reply.results[3].refused_message
    assert eventually(lambda: projected_version("batch-ben", 5))
