"""One trace per customer journey, metrics over OTLP, structured logs, and services that
carry on when no dashboard is there.

Real processes throughout: Zipkin (the project's dashboard), the agents gRPC server
and its Faust worker against the session's Kafka and MongoDB-wire database, and an
OTLP receiver made from OpenTelemetry's own collector protocol.  The trace is read
back from Zipkin's HTTP API, as SRE's tools would.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import mongoengine
import pytest
from centralino.v1 import agents_pb2 as pb
from centralino.v1 import agents_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.trace import TracerProvider
from pymongo import MongoClient

from infra.stack import ZipkinNode, ephemeral_dashboard, free_port
from services.kernel import mongo as kernel_mongo
from services.kernel.config import Settings
from services.kernel.grpc_telemetry import instrumented_channel
from services.kernel.runner import ServiceProcess
from services.kernel.telemetry import trace_id_hex
from tests.helpers import eventually
from tools import trace_journey, zipkin

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- #
# An OTLP metrics receiver: what a collector would get from us
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Point:
    service: str
    metric: str
    attributes: dict[str, Any]
    value: float  # a sum's or gauge's value, a histogram's count


def _plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _plain(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


class Collector(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self._requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._lock = threading.Lock()

    def Export(  # noqa: N802 (the protocol's name)
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        with self._lock:
            self._requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def points(self) -> list[Point]:
        with self._lock:
            requests = list(self._requests)
        found = []
        for request in requests:
            for resource_metrics in request.resource_metrics:
                service = _attributes(resource_metrics.resource.attributes).get("service.name", "")
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        kind = metric.WhichOneof("data")
                        if kind is None:
                            continue
                        for point in getattr(metric, kind).data_points:
                            value = point.count if kind == "histogram" else (point.as_int or point.as_double)
                            found.append(Point(service, metric.name, _attributes(point.attributes), value))
        return found

    def find(self, service: str, metric: str, attributes: dict[str, Any] | None = None) -> list[Point]:
        """The points received for `metric` from `service` having `attributes`, oldest first."""
        return [
            p
            for p in self.points()
            if p.service == service
            and p.metric == metric
            and all(p.attributes.get(key) == value for key, value in (attributes or {}).items())
        ]


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, str]]:
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


# --------------------------------------------------------------------------- #
# The platform, exporting traces to Zipkin and metrics to the receiver
# --------------------------------------------------------------------------- #


@dataclass
class Platform:
    settings: Settings
    target: str
    server: ServiceProcess
    worker: ServiceProcess
    zipkin: ZipkinNode


def base_env(settings: Settings, port: int) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "MONGO_URL": settings.mongo_url,
        "CENTRALINO_NAMESPACE": settings.namespace,
        "CENTRALINO_STATE_DIR": str(settings.state_dir),
        "CENTRALINO_RELAY_INTERVAL_S": "0.2",
        "AGENTS_GRPC_PORT": str(port),
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(Path.cwd() / "gen")]),
    }


def namespace_settings(stack: dict[str, str], state: Path) -> Settings:
    return Settings(
        kafka_bootstrap=stack["kafka_bootstrap"],
        mongo_url=stack["mongo_url"],
        namespace=f"t{uuid.uuid4().hex[:12]}",
        state_dir=state,
        relay_interval_s=0.2,
    )


@pytest.fixture(scope="module")
def platform(
    stack: dict[str, str], collector: tuple[Collector, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    state = tmp_path_factory.mktemp("observability")
    settings = namespace_settings(stack, state)
    port = free_port()
    with ephemeral_dashboard(state) as dashboard:
        env = {
            **base_env(settings, port),
            "OTEL_TRACES_EXPORTER": "zipkin",
            "OTEL_EXPORTER_ZIPKIN_ENDPOINT": dashboard.spans_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector[1],
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        }
        server = ServiceProcess("services.agents.server", env, state / "server.log").start()
        worker = ServiceProcess("services.agents.worker", env, state / "worker.log").start()
        kernel_mongo.connect(settings)
        try:
            server.wait_healthy(f"127.0.0.1:{port}")
            worker.wait_log(trace_journey.WORKER_READY)
            yield Platform(settings, f"127.0.0.1:{port}", server, worker, dashboard)
        finally:
            server.stop()
            worker.stop()
            kernel_mongo.drop_databases(mongoengine.connection.get_connection(), settings)
            kernel_mongo.disconnect()


@dataclass(frozen=True)
class Journey:
    trace_id: str
    agent_id: str
    started: float  # time.monotonic() when the journey began


@pytest.fixture(scope="module")
def console(platform: Platform) -> Iterator[TracerProvider]:
    """The caller's own tracing, as a console application's (service "centralino-console")."""
    provider = trace_journey.console_tracer_provider(platform.zipkin.spans_endpoint)
    yield provider
    provider.shutdown()


@pytest.fixture(scope="module")
def journey(platform: Platform, console: TracerProvider) -> Journey:
    agent_id = f"anna.rossi.{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    return Journey(trace_journey.run_journey(platform.target, console, agent_id), agent_id, started)


def json_lines(log: Path) -> list[dict[str, Any]]:
    entries = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a console exporter's multi-line JSON, not a log line
    return entries


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_one_trace_holds_the_whole_journey(platform: Platform, journey: Journey) -> None:
    topic = platform.settings.topic("agents")
    hops = trace_journey.journey_hops(topic)
    view, _ = zipkin.wait_for_trace(
        platform.zipkin.url, journey.trace_id, trace_journey.journey_complete(topic), timeout_s=60
    )
    seen_s = time.monotonic() - journey.started
    print(f"\nwhole journey in Zipkin {seen_s:.2f}s after it started:\n{view.render()}")

    found = zipkin.match_journey(view, hops)
    assert set(found) == {hop.label for hop in hops}, view.render()
    assert {"centralino-console", "centralino-agents", "centralino-agents-projections"} <= view.services
    # The Kafka hops, by the messaging conventions.
    sent, processed = found["kafka send"]["tags"], found["kafka process"]["tags"]
    assert sent["messaging.system"] == processed["messaging.system"] == "kafka"
    assert sent["messaging.destination.name"] == processed["messaging.destination.name"] == topic
    assert int(sent["messaging.batch.message_count"]) >= 1
    assert found["kafka send"]["parentId"] in {s["id"] for s in view.spans if s.get("kind") == "SERVER"}
    assert processed["messaging.message.id"] and processed["messaging.kafka.offset"]
    assert processed["messaging.consumer.group.name"] == platform.settings.consumer_group("agents-projections")
    assert found["read model"]["tags"]["db.collection.name"] == "agents_view"
    assert found["server"]["tags"]["rpc.response.status_code"] == "OK"
    # The read model keeps the trace id, so SRE can go from a document to its trace.
    agents_view = mongoengine.connection.get_db()["agents_view"]
    document = eventually(lambda: agents_view.find_one({"_id": journey.agent_id}), timeout_s=30)
    assert document["trace_id"] == journey.trace_id
    # No personal data anywhere in the trace: not the agent's name, not its id (a person's name here).
    recorded = json.dumps(view.spans)
    assert "Anna Rossi" not in recorded and journey.agent_id not in recorded


def test_the_journey_is_found_by_service_too(platform: Platform, journey: Journey) -> None:
    def listed() -> bool:
        traces = zipkin.find_traces(platform.zipkin.url, "centralino-agents-projections", limit=50)
        return any(span["traceId"] == journey.trace_id for trace in traces for span in trace)

    assert eventually(listed, timeout_s=30)
    ui = zipkin.ui_url(platform.zipkin.url, journey.trace_id)
    with urllib.request.urlopen(ui, timeout=10) as page:  # the UI serves the trace's page
        assert page.status == 200 and b"<html" in page.read().lower()


def test_metrics_reach_an_otlp_collector(
    platform: Platform, journey: Journey, collector: tuple[Collector, str]
) -> None:
    received, _ = collector
    topic = platform.settings.topic("agents")
    group = platform.settings.consumer_group("agents-projections")
    register = "centralino.v1.AgentsService/RegisterAgent"

    def all_there() -> bool:
        return all(
            [
                received.find("centralino-agents", "rpc.server.call.duration", {"rpc.method": register}),
                received.find(
                    "centralino-agents", "messaging.client.sent.messages", {"messaging.destination.name": topic}
                ),
                received.find("centralino-agents", "centralino.outbox.lag"),
                received.find("centralino-agents-projections", "messaging.client.consumed.messages"),
                received.find("centralino-agents-projections", "messaging.process.duration"),
                received.find("centralino-agents-projections", "centralino.projection.lag"),
                received.find("centralino-agents-projections", "centralino.kafka.consumer.lag"),
            ]
        )

    eventually(all_there, timeout_s=30)
    [rpc, *_] = received.find("centralino-agents", "rpc.server.call.duration", {"rpc.method": register})
    assert rpc.attributes["rpc.response.status_code"] == "OK" and rpc.value >= 1
    consumed = received.find("centralino-agents-projections", "messaging.client.consumed.messages")
    assert {p.attributes["centralino.projection.name"] for p in consumed} == {"agents-view"}  # events per agent
    assert max(p.value for p in consumed) >= 2  # the team and the agent, at least
    assert {p.attributes["messaging.consumer.group.name"] for p in consumed} == {group}

    lags = received.find("centralino-agents-projections", "centralino.kafka.consumer.lag")
    assert {p.attributes["messaging.destination.name"] for p in lags} == {topic}  # not Faust's own topics

    def caught_up() -> bool:
        latest: dict[str, float] = {}
        for point in received.find("centralino-agents-projections", "centralino.kafka.consumer.lag"):
            latest[point.attributes["messaging.destination.partition.id"]] = point.value
        return bool(latest) and not any(latest.values())

    assert eventually(caught_up, timeout_s=30)  # every event processed: no lag left


def test_a_refused_request_is_logged_with_its_trace(
    platform: Platform, console: TracerProvider, collector: tuple[Collector, str]
) -> None:
    tracer = console.get_tracer("centralino.console")
    with (
        tracer.start_as_current_span("register bad agent") as span,
        instrumented_channel(platform.target, tracer_provider=console) as channel,
    ):
        with pytest.raises(grpc.RpcError) as refused:
            agents_pb2_grpc.AgentsServiceStub(channel).RegisterAgent(
                pb.RegisterAgentRequest(agent_id="bad id!", name="x"), timeout=10
            )
        trace_id = trace_id_hex(span)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def logged() -> list[dict[str, Any]]:
        return [e for e in json_lines(platform.server.log_path) if e.get("trace_id") == trace_id]

    [entry] = eventually(logged, timeout_s=10)
    assert entry["level"] == "INFO" and entry["service.name"] == "centralino-agents"
    assert entry["message"] == "centralino.v1.AgentsService/RegisterAgent refused: INVALID_ARGUMENT"
    assert len(entry["span_id"]) == 16
    # Every line of both processes is structured, Faust's own included.
    for log in (platform.server.log_path, platform.worker.log_path):
        entries = json_lines(log)
        assert entries and all({"time", "level", "logger", "message", "service.name"} <= set(e) for e in entries)
    assert any(e["message"] == trace_journey.WORKER_READY for e in json_lines(platform.worker.log_path))

    received, _ = collector

    def counted_as_error() -> list[Point]:
        return received.find(
            "centralino-agents",
            "rpc.server.call.duration",
            {"rpc.method": "centralino.v1.AgentsService/RegisterAgent", "error.type": "INVALID_ARGUMENT"},
        )

    assert eventually(counted_as_error, timeout_s=30)


@pytest.mark.parametrize("exporter", ["zipkin", "otlp"])
def test_services_run_on_when_no_dashboard_is_there(exporter: str, stack: dict[str, str], tmp_path: Path) -> None:
    """Nothing listens where traces and metrics go: requests stay fast, the failure is logged
    once per signal, and flushing at exit does not hold the process up."""
    settings = namespace_settings(stack, tmp_path)
    port = free_port()
    nowhere = f"http://127.0.0.1:{free_port()}"
    env = {
        **base_env(settings, port),
        # "" is the variable unset: the specification's default, OTLP.
        "OTEL_TRACES_EXPORTER": "zipkin" if exporter == "zipkin" else "",
        "OTEL_EXPORTER_ZIPKIN_ENDPOINT": f"{nowhere}/api/v2/spans",
        "OTEL_METRICS_EXPORTER": "",
        "OTEL_EXPORTER_OTLP_ENDPOINT": nowhere,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",  # seconds per export, retries included
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
    }
    server = ServiceProcess("services.agents.server", env, tmp_path / "server.log").start()
    target = f"127.0.0.1:{port}"
    try:
        server.wait_healthy(target)
        latencies = []
        with grpc.insecure_channel(target) as channel:
            stub = agents_pb2_grpc.AgentsServiceStub(channel)
            for number in range(20):
                started = time.perf_counter()
                stub.CreateTeam(pb.CreateTeamRequest(team_id=f"team-{number}", name="T", supervisor_id="s"), timeout=5)
                latencies.append(time.perf_counter() - started)
                time.sleep(0.15)  # spread over several export rounds

        def failures() -> dict[str, int]:
            warnings = [e["message"] for e in json_lines(server.log_path) if e["level"] == "WARNING"]
            return {
                signal: sum(message.startswith(f"{signal} export to") for message in warnings)
                for signal in ("traces", "metrics")
            }

        eventually(lambda: all(failures().values()), timeout_s=20)
        time.sleep(2.0)  # more failed rounds...
        assert failures() == {"traces": 1, "metrics": 1}  # ...logged once
        server.check_alive()
    finally:
        stopping = time.monotonic()
        server.stop()
        stop_s = time.monotonic() - stopping
        client: MongoClient[dict[str, Any]] = MongoClient(settings.mongo_url)
        with client:
            for name in settings.databases:
                client.drop_database(name)
    latencies.sort()
    median_ms, max_ms = latencies[10] * 1000, latencies[-1] * 1000
    print(f"\nno dashboard ({exporter}): median {median_ms:.1f} ms, max {max_ms:.1f} ms, stopped in {stop_s:.1f}s")
    assert latencies[-1] < 1.0  # a request never waits for an export
    # Nor does stopping wait for a backend that is gone (the exit budget is 2s).
    [flushed] = [e for e in json_lines(server.log_path) if e["message"].startswith("telemetry flushed")]
    assert float(flushed["message"].split(" in ")[1].rstrip("s")) < 3.0
