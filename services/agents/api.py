"""Thin gRPC servicer: protobuf <-> primitives, domain errors <-> status codes."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import grpc
from centralino.v1 import agents_pb2 as pb
from centralino.v1 import agents_pb2_grpc
from centralino.v1.envelope_pb2 import EventEnvelope

from services.agents import domain
from services.agents.application import AgentsApplication, Clock
from services.agents.domain.schedule import Activity
from services.agents.queries import AgentFilter, AgentQueries, AgentReport
from services.agents.state_view import utc
from services.agents.watch import TeamWatchHub
from services.kernel.envelope import Metadata, new_id
from services.kernel.errors import DomainError
from services.kernel.grpc_server import domain_errors_as_status, status_for

PRODUCER = "centralino-agents"


def metadata_for(correlation_id: str) -> Metadata:
    # Each request is one command: its id is the causation of the events it produces.
    return Metadata(correlation_id=correlation_id or new_id(), causation_id=new_id(), producer=PRODUCER)


# ---- requests -> commands ---------------------------------------------------------------


def to_register_command(request: pb.RegisterAgentRequest) -> domain.RegisterAgent:
    return domain.RegisterAgent(
        agent_id=request.agent_id,
        name=request.name,
        team_id=request.team_id,
        seniority=request.seniority,
        skills=tuple((s.name, s.proficiency) for s in request.skills),
        channels=tuple((c.channel, c.max_concurrent) for c in request.channels),
    )


def to_change_command(request: pb.ChangeStateRequest, now: datetime) -> domain.ChangeState:
    return domain.ChangeState(
        agent_id=request.agent_id,
        transition=request.transition,
        at=request.at.ToDatetime(tzinfo=UTC) if request.HasField("at") else now,
        reason=request.reason,
        interaction_id=request.interaction_id,
        channel=request.channel,
        wrap_up_code=request.wrap_up_code,
    )


def to_schedule_command(request: pb.ScheduleShiftRequest) -> domain.ScheduleShift:
    return domain.ScheduleShift(
        agent_id=request.agent_id,
        shift_id=request.shift_id,
        shift_manager_id=request.shift_manager_id,
        start=request.start.ToDatetime(tzinfo=UTC),
        end=request.end.ToDatetime(tzinfo=UTC),
        activities=tuple(
            Activity(a.start.ToDatetime(tzinfo=UTC), a.end.ToDatetime(tzinfo=UTC), a.productive, a.reason)
            for a in request.activities
        ),
    )


def to_change_response(envelope: EventEnvelope) -> pb.ChangeStateResponse:
    event = pb.AgentStateChanged.FromString(envelope.payload)
    return pb.ChangeStateResponse(
        agent_id=envelope.aggregate_id, state=event.state, version=envelope.sequence, event_id=envelope.event_id
    )


# ---- read models -> responses -------------------------------------------------------------


def to_agent_view(view: dict[str, Any]) -> pb.AgentView:
    message = pb.AgentView(
        agent_id=view["agent_id"],
        name=view.get("name") or "",
        team_id=view.get("team_id") or "",
        seniority=cast(pb.Seniority, view.get("seniority") or 0),
        skills=[pb.Skill(name=s["name"], proficiency=s["proficiency"]) for s in view.get("skills", [])],
        channels=[
            pb.ChannelCapacity(channel=c["channel"], max_concurrent=c["max_concurrent"])
            for c in view.get("channels", [])
        ],
        version=view.get("version", 0),
    )
    if view.get("registered_at"):
        message.registered_at.FromDatetime(view["registered_at"])
    return message


def to_state_view(report: AgentReport) -> pb.AgentStateView:
    view = report.view
    message = pb.AgentStateView(
        agent_id=view["agent_id"],
        name=view.get("name") or "",
        team_id=view.get("team_id") or "",
        state=cast(pb.AgentState, view.get("state") or pb.LOGGED_OUT),
        reason=cast(pb.NotReadyReason, view.get("reason") or 0),
        version=view.get("version", 0),
        today=pb.DayCounters(**report.today),
        adherence=[pb.Adherence(**a) for a in report.adherence],
    )
    if view.get("since") is not None:
        message.since.FromDatetime(utc(view["since"]))
    for item in view.get("work", []):
        work = message.work.add(interaction_id=item["interaction_id"], channel=item["channel"], phase=item["phase"])
        work.since.FromDatetime(utc(item["since"]))
    for channel in view.get("channels", []):
        in_use = sum(1 for w in view.get("work", []) if w["channel"] == channel["channel"])
        message.channels.add(channel=channel["channel"], in_use=in_use, max_concurrent=channel["max_concurrent"])
    return message


def to_team_response(team: domain.Team) -> pb.TeamResponse:
    return pb.TeamResponse(team_id=team.team_id, version=team.version, members=len(team.members))


class AgentsServicer(agents_pb2_grpc.AgentsServiceServicer):
    def __init__(self, application: AgentsApplication, queries: AgentQueries, hub: TeamWatchHub, clock: Clock) -> None:
        self._app = application
        self._queries = queries
        self._hub = hub
        self._clock = clock

    # ---- commands ----

    def RegisterAgent(
        self, request: pb.RegisterAgentRequest, context: grpc.ServicerContext
    ) -> pb.RegisterAgentResponse:
        with domain_errors_as_status(context):
            command, meta = to_register_command(request), metadata_for(request.correlation_id)
            [last] = self._app.register_agent(command, meta, request.override_span_of_control)[-1:]
            return pb.RegisterAgentResponse(agent_id=last.aggregate_id, version=last.sequence, event_id=last.event_id)

    def ChangeState(self, request: pb.ChangeStateRequest, context: grpc.ServicerContext) -> pb.ChangeStateResponse:
        with domain_errors_as_status(context):
            command = to_change_command(request, self._clock())
            stamp_now = not request.HasField("at")
            [envelope] = self._app.change_state(command, metadata_for(request.correlation_id), stamp_now)
            return to_change_response(envelope)

    def ChangeStates(self, request: pb.ChangeStatesRequest, context: grpc.ServicerContext) -> pb.ChangeStatesResponse:
        now = self._clock()
        commands = [
            (to_change_command(change, now), metadata_for(change.correlation_id), not change.HasField("at"))
            for change in request.changes
        ]
        results = []
        for outcome in self._app.change_states(commands):  # one per change, in order
            if isinstance(outcome, DomainError):
                name = status_for(outcome).name
                results.append(pb.ChangeStateResult(refused_code=name, refused_message=str(outcome)))
                continue
            [envelope] = outcome
            results.append(pb.ChangeStateResult(accepted=to_change_response(envelope)))
        return pb.ChangeStatesResponse(results=results)

    def ScheduleShift(
        self, request: pb.ScheduleShiftRequest, context: grpc.ServicerContext
    ) -> pb.ScheduleShiftResponse:
        with domain_errors_as_status(context):
            [envelope] = self._app.schedule_shift(to_schedule_command(request), metadata_for(request.correlation_id))
            return pb.ScheduleShiftResponse(
                agent_id=request.agent_id, shift_id=request.shift_id, version=envelope.sequence
            )

    def CreateTeam(self, request: pb.CreateTeamRequest, context: grpc.ServicerContext) -> pb.TeamResponse:
        with domain_errors_as_status(context):
            command = domain.CreateTeam(request.team_id, request.name, request.supervisor_id)
            return to_team_response(self._app.create_team(command, metadata_for(request.correlation_id)))

    def AssignTeamLeader(self, request: pb.AssignTeamLeaderRequest, context: grpc.ServicerContext) -> pb.TeamResponse:
        with domain_errors_as_status(context):
            command = domain.AssignTeamLeader(request.team_id, request.team_leader_id, request.override_span_of_control)
            return to_team_response(self._app.assign_team_leader(command, metadata_for(request.correlation_id)))

    def MoveAgent(self, request: pb.MoveAgentRequest, context: grpc.ServicerContext) -> pb.TeamResponse:
        with domain_errors_as_status(context):
            meta = metadata_for(request.correlation_id)
            team = self._app.move_agent(request.agent_id, request.team_id, request.override_span_of_control, meta)
            return to_team_response(team)

    # ---- queries ----

    def GetAgent(self, request: pb.GetAgentRequest, context: grpc.ServicerContext) -> pb.AgentView:
        with domain_errors_as_status(context):
            return to_agent_view(self._queries.agent(request.agent_id).view)

    def GetAgentState(self, request: pb.GetAgentRequest, context: grpc.ServicerContext) -> pb.AgentStateView:
        with domain_errors_as_status(context):
            return to_state_view(self._queries.agent(request.agent_id, request.day))

    def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.ServicerContext) -> pb.ListAgentsResponse:
        with domain_errors_as_status(context):
            wanted = AgentFilter(
                request.team_id, request.skill, request.min_proficiency, request.state, request.available_on
            )
            return pb.ListAgentsResponse(agents=[to_state_view(r) for r in self._queries.agents(wanted)])

    def GetTeamStats(self, request: pb.GetTeamStatsRequest, context: grpc.ServicerContext) -> pb.TeamStats:
        with domain_errors_as_status(context):
            report = self._queries.team(request.team_id)
            return pb.TeamStats(
                team_id=request.team_id,
                team_leader_id=report.team.team_leader_id or "",
                supervisor_id=report.team.supervisor_id or "",
                agents_by_state=report.by_state,
                agents=[to_state_view(r) for r in report.agents],
                handled=report.handled,
                occupancy=report.occupancy,
                average_handle_time_s=report.average_handle_time_s,
            )

    def WatchTeam(self, request: pb.WatchTeamRequest, context: grpc.ServicerContext) -> Iterator[pb.AgentStateChange]:
        if not request.team_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "team_id: is required")
        if not self._hub.wait_ready(5.0):
            context.abort(grpc.StatusCode.UNAVAILABLE, "state changes are not available yet (Kafka unreachable)")
        subscription = self._hub.subscribe(request.team_id)
        context.add_callback(lambda: self._hub.unsubscribe(request.team_id, subscription))
        # Initial metadata tells the client the subscription is live: changes from now on arrive.
        context.send_initial_metadata((("subscribed", request.team_id),))
        while context.is_active():
            try:
                yield subscription.get(timeout=0.5)
            except queue.Empty:
                continue
