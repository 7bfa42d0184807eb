"""gRPC tracing and metrics, health and reflection, over a real in-process gRPC server on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from centralino.v1 import agents_pb2, agents_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from infra.stack import free_port
from services.kernel import metrics
from services.kernel.grpc_server import build_server
from services.kernel.grpc_telemetry import ServerTelemetry, instrumented_channel

PERSONAL = "Anna Rossi"


@dataclass
class Echo:
    target: str
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def channel(self) -> grpc.Channel:
        return instrumented_channel(
            self.target, tracer_provider=self.tracer_provider, meter=metrics.meter(self.meter_provider)
        )

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())


def say(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"refuse":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"agent anna.rossi ({PERSONAL}) is not known")
    if request == b"crash":
        raise RuntimeError(f"{PERSONAL} broke it")
    return request


def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for number in range(int(request)):
        yield str(number).encode()


@pytest.fixture
def echo() -> Iterator[Echo]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    port = free_port()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[ServerTelemetry("127.0.0.1", port, tracer_provider, metrics.meter(meter_provider))],
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.v1.Echo",
                {
                    "Say": grpc.unary_unary_rpc_method_handler(say),
                    "Count": grpc.unary_stream_rpc_method_handler(count),
                },
            )
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield Echo(f"127.0.0.1:{port}", spans, reader, tracer_provider, meter_provider)
    finally:
        server.stop(grace=None)


def call(channel: grpc.Channel, method: str, request: bytes) -> Any:
    return channel.unary_unary(method)(request, timeout=5)


def everything_recorded(span: ReadableSpan) -> str:
    return repr((span.name, dict(span.attributes or {}), span.status.description, [e.attributes for e in span.events]))


def test_client_and_server_spans_are_one_trace(echo: Echo) -> None:
    with echo.channel() as channel:
        assert call(channel, "/test.v1.Echo/Say", b"hello") == b"hello"
    server, client = sorted(echo.finished(), key=lambda s: s.kind.value)  # SERVER=1 < CLIENT=2
    assert (server.kind, client.kind) == (SpanKind.SERVER, SpanKind.CLIENT)
    assert server.name == client.name == "test.v1.Echo/Say"  # semantic conventions: the rpc.method
    assert server.context.trace_id == client.context.trace_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    for span in (server, client):
        attributes = dict(span.attributes or {})
        assert attributes["rpc.system.name"] == "grpc" and attributes["rpc.method"] == "test.v1.Echo/Say"
        assert attributes["rpc.response.status_code"] == "OK" and "error.type" not in attributes
        assert attributes["server.address"] == "127.0.0.1"
        assert span.status.status_code == StatusCode.UNSET


def test_refusals_are_the_callers_errors_and_details_stay_out_of_spans(echo: Echo) -> None:
    with echo.channel() as channel:
        with pytest.raises(grpc.RpcError) as refused:
            call(channel, "/test.v1.Echo/Say", b"refuse")
        assert PERSONAL in refused.value.details()  # the caller still gets the whole message
        with pytest.raises(grpc.RpcError) as crashed:
            call(channel, "/test.v1.Echo/Say", b"crash")
        assert crashed.value.code() == grpc.StatusCode.UNKNOWN
    spans = echo.finished()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    refused_server, crashed_server = servers
    assert refused_server.attributes is not None and refused_server.attributes["error.type"] == "INVALID_ARGUMENT"
    assert refused_server.status.status_code == StatusCode.UNSET  # a client error is not the server's fault
    assert crashed_server.attributes is not None and crashed_server.attributes["error.type"] == "RuntimeError"
    assert crashed_server.attributes["rpc.response.status_code"] == "UNKNOWN"
    assert crashed_server.status.status_code == StatusCode.ERROR and crashed_server.status.description == "UNKNOWN"
    assert [c.status.description for c in clients] == ["INVALID_ARGUMENT", "UNKNOWN"]  # errors for the caller
    assert all(PERSONAL not in everything_recorded(span) and "anna" not in everything_recorded(span) for span in spans)


def test_server_streams_are_traced_to_their_end(echo: Echo) -> None:
    with echo.channel() as channel:
        replies = list(channel.unary_stream("/test.v1.Echo/Count")(b"3", timeout=5))
    assert replies == [b"0", b"1", b"2"]
    server = next(s for s in echo.finished() if s.kind == SpanKind.SERVER)
    client = next(s for s in echo.finished() if s.kind == SpanKind.CLIENT)
    assert server.name == "test.v1.Echo/Count" and server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.attributes is not None and server.attributes["rpc.response.status_code"] == "OK"


def test_health_checks_are_not_traced(echo: Echo) -> None:
    with echo.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert [s.kind for s in echo.finished()] == [SpanKind.CLIENT]  # the probe's own span only, if the prober traces


def histograms(reader: InMemoryMetricReader) -> dict[str, dict[tuple[Any, ...], HistogramDataPoint]]:
    """{metric name: {(rpc.method, status code, error.type): data point}}"""
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, dict[tuple[Any, ...], HistogramDataPoint]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        labels = point.attributes or {}
                        key = (labels["rpc.method"], labels["rpc.response.status_code"], labels.get("error.type"))
                        found.setdefault(metric.name, {})[key] = point
    return found


def test_rate_errors_and_duration_per_rpc_are_measured(echo: Echo) -> None:
    with echo.channel() as channel:
        for request in (b"a", b"b", b"refuse"):
            with contextlib.suppress(grpc.RpcError):
                call(channel, "/test.v1.Echo/Say", request)
    measured = histograms(echo.reader)
    for name in ("rpc.server.call.duration", "rpc.client.call.duration"):
        points = measured[name]
        assert points[("test.v1.Echo/Say", "OK", None)].count == 2  # the request rate
        assert points[("test.v1.Echo/Say", "INVALID_ARGUMENT", "INVALID_ARGUMENT")].count == 1  # the errors
        assert 0 < points[("test.v1.Echo/Say", "OK", None)].sum < 5  # seconds


def test_every_server_answers_health_checks_and_reflection() -> None:
    port = free_port()
    service = agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].full_name
    server, _ = build_server(
        port,
        "127.0.0.1",
        [lambda s: agents_pb2_grpc.add_AgentsServiceServicer_to_server(agents_pb2_grpc.AgentsServiceServicer(), s)],
        [service],
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = health_stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = ProtoReflectionDescriptorDatabase(channel)
            assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
                reflection.get_services()
            )
            described = reflection.FindFileContainingSymbol(service)
            assert any(s.name == "AgentsService" for s in described.service)  # what grpcurl describes from
    finally:
        server.stop(grace=None)
