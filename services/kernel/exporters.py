"""Telemetry exporters chosen by the standard variables, and made harmless when their backend is gone.

`OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` name them, comma-separated:
`otlp` (gRPC, or HTTP with OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf), `zipkin`,
`console`, `none`, or any exporter installed under OpenTelemetry's entry points.

Every exporter is wrapped in an `ExportGuard`:

* a failing backend is logged once per outage (and once more when it is back),
  never once per batch and retry as the exporters themselves would;
* exports run on the SDK's background threads, so requests never wait for them;
* at process exit, an exporter whose backend was failing is not waited for at
  all, and a healthy one gets a bounded time, so a service stops promptly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from services.kernel.logs import hold_sdk_logs

log = logging.getLogger(__name__)

_ENTRY_POINT_GROUPS = {"traces": "opentelemetry_traces_exporter", "metrics": "opentelemetry_metrics_exporter"}


class UnknownExporter(ValueError):
    pass


class ExportGuard:
    """Runs one exporter's exports: reports failures once per outage, bounds them at exit."""

    def __init__(self, signal: str, name: str, target: str) -> None:
        self.signal = signal
        self.name = name
        self.target = target
        self.failing = False
        self._deadline: float | None = None  # monotonic; set when the process is stopping

    def close_by(self, deadline: float) -> None:
        self._deadline = deadline

    def run(self, attempt: Callable[[], bool], abort: Callable[[], None]) -> bool:
        if self._deadline is None:
            ok, problem = self._attempt(attempt)
        elif self.failing:
            return False  # stopping, and the backend was down a moment ago: drop, do not wait
        else:
            ok, problem = self._attempt_within(attempt, abort, self._deadline - time.monotonic())
        self._report(ok, problem)
        return ok

    @staticmethod
    def _attempt(attempt: Callable[[], bool]) -> tuple[bool, str]:
        with hold_sdk_logs() as held:
            try:
                ok = attempt()
            except Exception as exc:  # e.g. requests' ConnectionError from the Zipkin exporter
                return False, f"{type(exc).__name__}: {exc}"
        if ok:
            return True, ""
        messages = [record.getMessage() for record in held if record.levelno >= logging.WARNING]
        return False, messages[-1] if messages else "the exporter reported a failure"

    def _attempt_within(
        self, attempt: Callable[[], bool], abort: Callable[[], None], timeout_s: float
    ) -> tuple[bool, str]:
        if timeout_s <= 0:
            return False, "no time left at exit"
        outcome: list[tuple[bool, str]] = []
        worker = threading.Thread(target=lambda: outcome.append(self._attempt(attempt)), daemon=True)
        worker.start()
        worker.join(timeout_s)
        if outcome:
            return outcome[0]
        abort()  # ends the exporter's retry loop, so the abandoned thread finishes soon
        return False, f"still not done after {timeout_s:.1f}s at exit; abandoned"

    def _report(self, ok: bool, problem: str) -> None:
        if ok and self.failing:
            self.failing = False
            log.info("%s export to %s (%s) works again", self.signal, self.target, self.name)
        elif not ok and not self.failing:
            self.failing = True
            log.warning(
                "%s export to %s (%s) failed: %s. The service carries on without it; "
                "this is not logged again until an export succeeds",
                self.signal,
                self.target,
                self.name,
                problem,
            )


def _target(exporter: object) -> str:
    for attribute in ("endpoint", "_endpoint"):
        value = getattr(exporter, attribute, None)
        if isinstance(value, str) and value:
            return value
    return "stdout" if "Console" in type(exporter).__name__ else type(exporter).__name__


class GuardedSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, name: str) -> None:
        self.inner = inner
        self.guard = ExportGuard("traces", name, _target(inner))

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        ok = self.guard.run(lambda: self.inner.export(spans) == SpanExportResult.SUCCESS, self.inner.shutdown)
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.inner.shutdown()


class GuardedMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, name: str) -> None:
        # The reader asks the exporter which temporality and aggregation it prefers.
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.guard = ExportGuard("metrics", name, _target(inner))

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        def attempt() -> bool:
            return (
                self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs) == MetricExportResult.SUCCESS
            )

        ok = self.guard.run(attempt, self.inner.shutdown)
        return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def exporter_names(value: str) -> list[str]:
    """`OTEL_*_EXPORTER` values: comma-separated, `none` alone means nothing."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    return [name for name in names if name != "none"]


def _otlp(signal: str, protocol: str) -> Any:
    if protocol.startswith("http"):
        if signal == "traces":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    if signal == "traces":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

    return GrpcMetricExporter()


def _create(signal: str, name: str, otlp_protocol: str) -> Any:
    if name == "otlp":
        return _otlp(signal, otlp_protocol)
    if name == "zipkin" and signal == "traces":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        return ZipkinExporter()  # OTEL_EXPORTER_ZIPKIN_ENDPOINT, default http://localhost:9411/api/v2/spans
    if name == "console":
        if signal == "traces":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    found = entry_points(group=_ENTRY_POINT_GROUPS[signal], name=name)
    if not found:
        raise UnknownExporter(f"no {signal} exporter named {name!r} is installed")
    return next(iter(found)).load()()


def span_exporters(value: str, otlp_protocol: str = "grpc") -> list[GuardedSpanExporter]:
    """The span exporters named by an OTEL_TRACES_EXPORTER value; unknown names are logged and skipped."""
    exporters = []
    for name in exporter_names(value):
        try:
            exporters.append(GuardedSpanExporter(_create("traces", name, otlp_protocol), name))
        except UnknownExporter as exc:
            log.warning("OTEL_TRACES_EXPORTER: %s; traces are not sent there", exc)
    return exporters


def metric_exporters(value: str, otlp_protocol: str = "grpc") -> list[GuardedMetricExporter]:
    """The metric exporters named by an OTEL_METRICS_EXPORTER value; unknown names are logged and skipped."""
    exporters = []
    for name in exporter_names(value):
        try:
            exporters.append(GuardedMetricExporter(_create("metrics", name, otlp_protocol), name))
        except UnknownExporter as exc:
            log.warning("OTEL_METRICS_EXPORTER: %s; metrics are not sent there", exc)
    return exporters
