"""`make trace-screenshot`: one journey traced end to end into Zipkin, checked, and photographed.

Starts the agents service and its projection worker exporting to Zipkin, onboards
one agent through an instrumented gRPC client (service "centralino-console"),
then reads the trace back from Zipkin's API until it covers the whole path
(client -> gRPC server -> MongoDB event store -> Kafka producer -> Faust
consumer -> MongoDB read model) and takes a headless Chromium screenshot of it
in Zipkin's UI.

    python -m tools.trace_journey [--zipkin URL] [--screenshot PATH]

Kafka and MongoDB come from KAFKA_BOOTSTRAP / MONGO_URL (`make infra-up`'s by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from centralino.v1 import agents_pb2 as pb
from centralino.v1 import agents_pb2_grpc
from opentelemetry.exporter.zipkin.json import ZipkinExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from infra.stack import StackError, free_port, probe_zipkin
from services.kernel.config import Settings, load_settings
from services.kernel.grpc_telemetry import instrumented_channel
from services.kernel.runner import ServiceProcess
from services.kernel.telemetry import resource_for, trace_id_hex
from tools import zipkin
from tools.zipkin import Hop, TraceView

CONSOLE = "centralino-console"
AGENTS = "centralino-agents"
PROJECTIONS = "centralino-agents-projections"
JOURNEY = "onboard agent"
WORKER_READY = "[^Worker]: Ready"


def journey_hops(topic: str) -> list[Hop]:
    """Every hop of one onboarding, each the child of the one before it."""
    registered = {"cloudevents.event_type": "agents.AgentRegistered"}
    return [
        Hop("journey", CONSOLE, "", JOURNEY),
        Hop("client", CONSOLE, "CLIENT", "centralino.v1.AgentsService/RegisterAgent", parent="journey"),
        Hop("server", AGENTS, "SERVER", "centralino.v1.AgentsService/RegisterAgent", parent="client"),
        Hop("event store", AGENTS, "CLIENT", "insert event_store", parent="server"),
        # The relay sends a batch as one span, in its first record's trace (this one's, or
        # CreateTeam's when both requests' events went in one batch); each record names the
        # request that stored it, so the projection's span is that request's child.
        Hop("kafka send", AGENTS, "PRODUCER", f"send {topic}"),
        Hop("kafka process", PROJECTIONS, "CONSUMER", f"process {topic}", registered, parent="server"),
        Hop("read model", PROJECTIONS, "CLIENT", "update agents_view", parent="kafka process"),
    ]


def journey_complete(topic: str) -> Callable[[TraceView], bool]:
    hops = journey_hops(topic)
    return lambda view: len(zipkin.match_journey(view, hops)) == len(hops)


def console_tracer_provider(spans_endpoint: str) -> TracerProvider:
    """The client's own tracing: a console operator's application, as SRE would see it."""
    provider = TracerProvider(resource=resource_for(CONSOLE))
    provider.add_span_processor(SimpleSpanProcessor(ZipkinExporter(endpoint=spans_endpoint)))
    return provider


def run_journey(target: str, tracer_provider: TracerProvider, agent_id: str) -> str:
    """Onboard one agent (a team, then the agent in it) in one trace; returns its trace id."""
    tracer = tracer_provider.get_tracer("centralino.console")
    team_id = f"team-{agent_id}"
    with instrumented_channel(target, tracer_provider=tracer_provider) as channel:
        stub = agents_pb2_grpc.AgentsServiceStub(channel)
        with tracer.start_as_current_span(JOURNEY) as span:
            stub.CreateTeam(pb.CreateTeamRequest(team_id=team_id, name="Milano 1", supervisor_id="sup-1"), timeout=10)
            stub.RegisterAgent(
                pb.RegisterAgentRequest(
                    agent_id=agent_id,
                    name="Anna Rossi",
                    team_id=team_id,
                    seniority=pb.SENIOR_CONSULTANT,
                    skills=[pb.Skill(name="customer_service", proficiency=5), pb.Skill(name="lang:it", proficiency=5)],
                    channels=[pb.ChannelCapacity(channel=pb.VOICE, max_concurrent=1)],
                ),
                timeout=10,
            )
            return trace_id_hex(span)


def service_env(spans_endpoint: str, grpc_port: int) -> dict[str, str]:
    return {
        "AGENTS_GRPC_PORT": str(grpc_port),
        "OTEL_TRACES_EXPORTER": "zipkin",
        "OTEL_EXPORTER_ZIPKIN_ENDPOINT": spans_endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms; a dashboard should show a trace promptly
        # Zipkin shows traces only; metrics go wherever the caller says, else nowhere.
        "OTEL_METRICS_EXPORTER": os.environ.get("OTEL_METRICS_EXPORTER", "none"),
    }


def start_services(env: Mapping[str, str], logs: Path, target: str) -> tuple[ServiceProcess, ServiceProcess]:
    server = ServiceProcess("services.agents.server", env, logs / "trace-agents-server.log").start()
    worker = ServiceProcess("services.agents.worker", env, logs / "trace-agents-worker.log").start()
    try:
        server.wait_healthy(target)
        worker.wait_log(WORKER_READY)
    except BaseException:
        server.stop()
        worker.stop()
        raise
    return server, worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.trace_journey", description=__doc__.split("\n\n")[0])
    default_zipkin = os.environ.get("ZIPKIN_URL") or f"http://127.0.0.1:{os.environ.get('ZIPKIN_PORT') or 9411}"
    parser.add_argument("--zipkin", default=default_zipkin, help=f"Zipkin's base URL (default {default_zipkin})")
    parser.add_argument("--screenshot", type=Path, default=Path(".stack/trace.png"), help="where the PNG goes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step")
    args = parser.parse_args(argv)
    base = args.zipkin.rstrip("/")
    try:
        probe_zipkin(base, 5.0)
    except (OSError, StackError) as exc:
        print(f"trace_journey: no Zipkin at {base} ({exc}); start it with `make dashboard-up`", file=sys.stderr)
        return 1

    settings: Settings = load_settings()
    port = free_port()
    target = f"{settings.grpc_host}:{port}"
    spans_endpoint = f"{base}/api/v2/spans"
    server, worker = start_services(service_env(spans_endpoint, port), settings.state_dir / "logs", target)
    console = console_tracer_provider(spans_endpoint)
    try:
        agent_id = f"trace-demo-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        trace_id = run_journey(target, console, agent_id)
        answered_s = time.monotonic() - started
        # The trace is complete once the read model's write is in it: that is the end of the journey.
        view, _ = zipkin.wait_for_trace(base, trace_id, journey_complete(settings.topic("agents")), args.timeout)
        print(f"trace {trace_id}: {len(view.spans)} spans from {', '.join(sorted(view.services))}")
        print(view.render())
        print(
            f"requests answered in {answered_s:.2f}s; the whole journey, read model included, "
            f"was in Zipkin {time.monotonic() - started:.2f}s after it started"
        )
    finally:
        console.shutdown()
        server.stop()
        worker.stop()
    url = zipkin.ui_url(base, trace_id)
    png = zipkin.screenshot(url, args.screenshot)
    print(f"screenshot of {url} -> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
