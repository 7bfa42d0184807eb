"""Telemetry plumbing without infrastructure: exporter choice, failure reporting, exit
bounds, structured logs, span filtering and the platform's metric instruments."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.exporter.zipkin.json import ZipkinExporter
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.kernel import logs, metrics, mongo
from services.kernel.config import Settings, load_settings
from services.kernel.exporters import GuardedSpanExporter, exporter_names, metric_exporters, span_exporters
from services.kernel.telemetry import (
    DropOrphanDatabaseSpans,
    build_telemetry,
    context_from_headers,
    headers_for,
    trace_id_hex,
)


class FlakyExporter(SpanExporter):
    """Fails (the way the OTLP exporter does: logging, then FAILURE) while `down` is set."""

    def __init__(self) -> None:
        self.down = True
        self.raises = False
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        if not self.down:
            return SpanExportResult.SUCCESS
        if self.raises:
            raise ConnectionError("connection refused")
        logging.getLogger("opentelemetry.exporter.fake").warning("Transient error, retrying in 1s")
        logging.getLogger("opentelemetry.exporter.fake").error("Failed to export traces to dashboard:4317")
        return SpanExportResult.FAILURE


class SlowExporter(SpanExporter):
    """Blocks like an exporter retrying against a dead backend, until shut down."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.stopped.wait(30)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.stopped.set()


@pytest.fixture
def root_logging() -> Iterator[StringIO]:
    """Our handler on the root logger, writing to a buffer; the previous setup restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = StringIO()
    root.handlers[:] = [logs.make_handler("centralino-test", "json", stream=buffer)]
    root.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def lines(buffer: StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_exporters_are_chosen_by_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://127.0.0.1:1/api/v2/spans")
    assert load_settings({}).traces_exporter == "otlp"  # the specification's default
    assert load_settings({"OTEL_TRACES_EXPORTER": " Zipkin "}).traces_exporter == "zipkin"
    assert exporter_names("otlp, zipkin") == ["otlp", "zipkin"] and exporter_names("none") == []

    [zipkin] = span_exporters("zipkin")
    assert isinstance(zipkin.inner, ZipkinExporter) and zipkin.guard.target == "http://127.0.0.1:1/api/v2/spans"
    [grpc_otlp] = span_exporters("otlp")
    [http_otlp] = span_exporters("otlp", "http/protobuf")
    assert isinstance(grpc_otlp.inner, GrpcSpanExporter) and isinstance(http_otlp.inner, HttpSpanExporter)
    assert [e.guard.name for e in span_exporters("console,zipkin")] == ["console", "zipkin"]
    assert span_exporters("none") == [] and metric_exporters("") == []


def test_an_unknown_exporter_is_reported_and_skipped(root_logging: StringIO) -> None:
    assert span_exporters("jaeger-thrift") == []
    assert metric_exporters("zipkin") == []  # Zipkin takes traces only
    warnings = [entry["message"] for entry in lines(root_logging) if entry["level"] == "WARNING"]
    assert any("jaeger-thrift" in message for message in warnings)
    assert any("OTEL_METRICS_EXPORTER" in message and "zipkin" in message for message in warnings)


def test_a_failing_backend_is_logged_once_per_outage(root_logging: StringIO) -> None:
    flaky = FlakyExporter()
    guarded = GuardedSpanExporter(flaky, "otlp")
    for _ in range(5):
        assert guarded.export([]) == SpanExportResult.FAILURE
    flaky.raises = True  # exporters that raise (Zipkin's on a refused connection) are contained too
    assert guarded.export([]) == SpanExportResult.FAILURE
    flaky.down = False
    assert guarded.export([]) == SpanExportResult.SUCCESS
    flaky.down, flaky.raises = True, False
    guarded.export([])

    entries = lines(root_logging)
    assert not [e for e in entries if e["logger"].startswith("opentelemetry.")]  # the exporter's own noise is held
    failures = [e for e in entries if e["level"] == "WARNING"]
    assert len(failures) == 2  # first outage, second outage
    assert "Failed to export traces to dashboard:4317" in failures[0]["message"]
    assert "not logged again" in failures[0]["message"]
    recovered = [e["message"] for e in entries if e["level"] == "INFO"]
    assert recovered == ["traces export to FlakyExporter (otlp) works again"]
    assert flaky.calls == 8


def test_stopping_waits_for_a_slow_backend_only_briefly() -> None:
    slow = SlowExporter()
    telemetry = build_telemetry("t", Settings(), exporters=[GuardedSpanExporter(slow, "otlp")], metric_readers=[])
    telemetry.tracer_provider.get_tracer("t").start_span("work").end()
    started = time.monotonic()
    telemetry.shutdown(timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert slow.calls == 1 and slow.stopped.is_set()  # the abandoned export was told to stop


def test_stopping_does_not_wait_for_a_backend_known_to_be_down() -> None:
    flaky = FlakyExporter()
    guarded = GuardedSpanExporter(flaky, "zipkin")
    guarded.export([])  # the backend is down...
    telemetry = build_telemetry("t", Settings(), exporters=[guarded], metric_readers=[])
    telemetry.tracer_provider.get_tracer("t").start_span("work").end()
    telemetry.shutdown(timeout_s=5)
    assert flaky.calls == 1  # ...so the last batch is dropped without another try


def test_log_lines_are_json_with_the_trace_and_span_of_the_work(root_logging: StringIO) -> None:
    provider = TracerProvider()
    log = logging.getLogger("centralino.test")
    with provider.get_tracer("t").start_as_current_span("request") as span:
        log.info("command refused: %s", "INVALID_ARGUMENT", extra={"rpc.method": "x/Y"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("handler failed")
    log.warning("outside any request")

    inside, failed, outside = lines(root_logging)
    context = span.get_span_context()
    assert inside["message"] == "command refused: INVALID_ARGUMENT" and inside["level"] == "INFO"
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert inside["service.name"] == "centralino-test" and inside["rpc.method"] == "x/Y"
    assert failed["exception.type"] == "ValueError" and "boom" in failed["exception.stacktrace"]
    assert "trace_id" not in outside


def test_faust_workers_keep_our_handler(root_logging: StringIO) -> None:
    options = logs.faust_logging()
    assert options["loghandlers"] == logs.installed_handlers() and len(options["loghandlers"]) == 1
    assert options["logging_config"]["root"]["handlers"] == []
    assert options["logging_config"]["disable_existing_loggers"] is False
    logging.getLogger().handlers[:] = []
    assert logs.faust_logging() == {}  # not configured by us: Faust's own logging stays


def test_database_spans_outside_any_trace_are_dropped() -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(DropOrphanDatabaseSpans(SimpleSpanProcessor(exported)))
    tracer = provider.get_tracer("t")
    tracer.start_span("find event_store", attributes={"db.system.name": "mongodb"}).end()  # relay polling
    with tracer.start_as_current_span("request"):
        tracer.start_span("insert event_store", attributes={"db.system.name": "mongodb"}).end()
    tracer.start_span("startup").end()
    assert sorted(span.name for span in exported.get_finished_spans()) == ["insert event_store", "request", "startup"]


def test_trace_context_round_trips_through_record_headers() -> None:
    tracer = TracerProvider().get_tracer("t")
    span = tracer.start_span("send topic")
    headers = [(key, value.encode()) for key, value in headers_for(span).items()]
    with tracer.start_as_current_span("process topic", context=context_from_headers(headers)) as child:
        assert trace_id_hex(child) == trace_id_hex(span)
        assert isinstance(child, ReadableSpan) and child.parent is not None
        assert child.parent.span_id == span.get_span_context().span_id
    assert trace_id_hex() == ""  # no active span: no id


def collected(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def test_consumer_lag_and_routing_queue_sizes_are_observed() -> None:
    reader = InMemoryMetricReader()
    meter = metrics.meter(MeterProvider(metric_readers=[reader]))
    metrics.register_observers(meter)
    lag = metrics.ConsumerLag("centralino-agents-projections")
    lag.topics.add("centralino.agents.events")
    remove_lag = metrics.CONSUMER_LAG.add(lag.observe)
    remove_queues = metrics.observe_routing_queue_sizes(lambda: {"voice:it": 4, "chat:pl": 0})
    try:
        lag.refreshed({("centralino.agents.events", 0): (10, 7), ("faust-internal", 0): (5, 0)})
        lag.processed("centralino.agents.events", 1, next_offset=3, highwater=8)
        points = collected(reader)
        assert partition_lags(points) == {"0": 3, "1": 5}  # high watermark - next offset; not Faust's own topics
        queues = {p.attributes["centralino.routing.queue"]: p.value for p in points["centralino.routing.queue.size"]}
        assert queues == {"voice:it": 4, "chat:pl": 0}

        lag.processed("centralino.agents.events", 0, next_offset=10, highwater=10)
        lag.refreshed({("centralino.agents.events", 0): (12, 10)})  # partition 1 revoked, 2 new events on 0
        assert partition_lags(collected(reader)) == {"0": 2}
    finally:
        remove_lag()
        remove_queues()


def partition_lags(points: dict[str, list[Any]]) -> dict[str, int]:
    lags = points["centralino.kafka.consumer.lag"]
    return {point.attributes["messaging.destination.partition.id"]: point.value for point in lags}


def test_instruments_are_made_once_per_meter() -> None:
    meter = metrics.meter(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    first = metrics.instruments(metrics.ProjectionMetrics, meter)
    assert metrics.instruments(metrics.ProjectionMetrics, meter) is first
    assert metrics.instruments(metrics.RpcMetrics, meter) is not first


SETUP_SCRIPT = """
import logging
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from services.kernel.telemetry import setup_tracing

provider = setup_tracing("centralino-test")
assert setup_tracing("centralino-other") is provider  # one set-up per process
assert isinstance(metrics.get_meter_provider(), MeterProvider)
with trace.get_tracer("t").start_as_current_span("work"):
    logging.getLogger("app").info("inside")
"""


def test_setup_tracing_sets_up_traces_metrics_and_logs_in_one_call() -> None:
    """In a process of its own: it installs process-wide providers and the root log handler."""
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(Path.cwd() / "gen")]),
    }
    done = subprocess.run([sys.executable, "-c", SETUP_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [inside] = [e for e in entries if e["message"] == "inside"]
    assert inside["service.name"] == "centralino-test"
    assert any("already set up" in e["message"] and e["level"] == "WARNING" for e in entries)
    assert any(e["message"].startswith("telemetry flushed and stopped") for e in entries)  # at exit
    span = json.loads(done.stdout)  # the console exporter's rendering of the span
    assert span["name"] == "work" and span["context"]["trace_id"] == f"0x{inside['trace_id']}"
    assert span["resource"]["attributes"]["service.name"] == "centralino-test"


def test_one_database_call_for_many_traces_gets_a_span_in_each() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    parents = [tracer.start_span(f"process {n}") for n in range(3)]
    with mongo.shared_command_spans(parents, "update", "agents_view", "db", tracer=tracer):
        assert not is_instrumentation_enabled()  # pymongo's own span would sit in one trace only
    with pytest.raises(RuntimeError), mongo.shared_command_spans(parents[:1], "update", "agents_view", "db", tracer):
        raise RuntimeError("refused")
    spans = exporter.get_finished_spans()
    assert [(span.name, span.kind, span.parent.span_id) for span in spans] == [  # type: ignore[union-attr]
        *[("update agents_view", SpanKind.CLIENT, parent.get_span_context().span_id) for parent in parents],
        ("update agents_view", SpanKind.CLIENT, parents[0].get_span_context().span_id),
    ]
    assert [span.attributes["db.operation.batch.size"] for span in spans] == [3, 3, 3, 1]  # type: ignore[index]
    assert spans[0].attributes["db.collection.name"] == "agents_view"  # type: ignore[index]
    assert [span.status.status_code for span in spans] == [StatusCode.UNSET] * 3 + [StatusCode.ERROR]
