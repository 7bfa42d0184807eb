"""OpenTelemetry for a service process: traces, metrics and structured logs, and the
W3C trace context carried in Kafka record headers.

`setup_tracing(service_name)` is the one call a process makes at start.  Nothing
happens at import.  Spans exist (and so trace ids travel through Kafka into the
read models) whatever the exporters; which exporters run is chosen by the
standard OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER (see `exporters`).
"""

from __future__ import annotations

import atexit
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_NAMESPACE, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from services.kernel import logs, mongo
from services.kernel import metrics as kernel_metrics
from services.kernel.config import Settings, load_settings
from services.kernel.exporters import ExportGuard, GuardedMetricExporter, metric_exporters, span_exporters

log = logging.getLogger(__name__)

NAMESPACE = "centralino"


class DropOrphanDatabaseSpans(SpanProcessor):
    """Keeps database spans only where they are part of a trace.

    MongoDB calls outside any request (the outbox relay polling every second,
    index creation at start) would otherwise each become a one-span trace and
    bury the journeys SRE is looking for.
    """

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self._inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        attributes = span.attributes or {}
        if span.parent is None and ("db.system" in attributes or "db.system.name" in attributes):
            return
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


def resource_for(service_name: str) -> Resource:
    # OTEL_RESOURCE_ATTRIBUTES adds to these; the department's name is not overridable.
    return Resource.create(
        {SERVICE_NAME: service_name, SERVICE_NAMESPACE: NAMESPACE, SERVICE_INSTANCE_ID: str(uuid.uuid4())}
    )


@dataclass
class Telemetry:
    """The providers of one process and the guards of their exporters."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    guards: list[ExportGuard] = field(default_factory=list)

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Flush what is buffered, waiting at most about `timeout_s` for a backend."""
        started = time.monotonic()
        for guard in self.guards:
            guard.close_by(started + timeout_s)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=max(timeout_s, 0.1) * 1000)
        log.info("telemetry flushed and stopped in %.2fs", time.monotonic() - started)


def build_telemetry(
    service_name: str,
    settings: Settings,
    *,
    exporters: Sequence[SpanExporter] | None = None,
    metric_readers: Sequence[MetricReader] | None = None,
) -> Telemetry:
    """Providers for `service_name` with the exporters `settings` name (or those given), not installed globally."""
    resource = resource_for(service_name)
    guards: list[ExportGuard] = []
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if exporters is None:
        exporters = span_exporters(settings.traces_exporter, settings.otlp_protocol)
    for exporter in exporters:
        guard = getattr(exporter, "guard", None)
        if isinstance(guard, ExportGuard):
            guards.append(guard)
        # Batching on a background thread: a request only appends to a queue.
        # OTEL_BSP_* (delay, queue and batch sizes) are read by the processor.
        tracer_provider.add_span_processor(DropOrphanDatabaseSpans(BatchSpanProcessor(exporter)))
    if metric_readers is None:
        guarded_metric_exporters: list[GuardedMetricExporter] = metric_exporters(
            settings.metrics_exporter, settings.otlp_protocol
        )
        guards.extend(exporter.guard for exporter in guarded_metric_exporters)
        # OTEL_METRIC_EXPORT_INTERVAL / _TIMEOUT are read by the reader.
        metric_readers = [PeriodicExportingMetricReader(exporter) for exporter in guarded_metric_exporters]
    meter_provider = MeterProvider(resource=resource, metric_readers=list(metric_readers), shutdown_on_exit=False)
    return Telemetry(tracer_provider, meter_provider, guards)


def setup_tracing(service_name: str) -> TracerProvider:
    """Set up traces, metrics and structured logs for this process (`service.name` = `service_name`).

    Call once, first thing in `main()`: before MongoDB clients are made (their
    commands are traced from then on) and before the gRPC server is built.
    """
    installed = trace.get_tracer_provider()
    if isinstance(installed, TracerProvider):  # the SDK allows one provider per process
        log.warning("telemetry is already set up in this process; setup_tracing(%r) changes nothing", service_name)
        return installed
    settings = load_settings()
    logs.configure_logging(service_name, settings.log_level, settings.log_format)
    telemetry = build_telemetry(service_name, settings)
    trace.set_tracer_provider(telemetry.tracer_provider)
    metrics.set_meter_provider(telemetry.meter_provider)
    kernel_metrics.register_observers(kernel_metrics.meter())
    mongo.instrument(telemetry.tracer_provider)
    # Ours instead of the SDK's own exit hooks, which could wait on a dead backend for long.
    atexit.register(telemetry.shutdown, settings.telemetry_exit_timeout_s)
    log.info(
        "telemetry for %s: traces -> %s, metrics -> %s",
        service_name,
        settings.traces_exporter,
        settings.metrics_exporter,
    )
    return telemetry.tracer_provider


def current_trace_headers() -> dict[str, str]:
    """The active span's context as W3C `traceparent`/`tracestate` entries."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def headers_for(span: trace.Span) -> dict[str, str]:
    """The W3C entries that make `span` the parent of whatever reads them."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def context_from_headers(
    headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | Mapping[str, str],
) -> otel_context.Context:
    items = headers.items() if isinstance(headers, Mapping) else headers
    carrier = {key: value.decode() if isinstance(value, bytes) else value for key, value in items}
    return propagate.extract(carrier)


def trace_id_hex(span: trace.Span | None = None) -> str:
    span_context = (span or trace.get_current_span()).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
