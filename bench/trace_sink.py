"""An OTLP/gRPC receiver that keeps nothing: where the bench's services send their telemetry.

A deployment sends traces and metrics to a collector.  Without one, the exporters spend
their time failing and retrying while the span queues overflow, which is neither the cost
of tracing nor the cost of no tracing.  `python -m bench.trace_sink` listens on
127.0.0.1:$BENCH_SINK_PORT, accepts every export and counts what it got; at SIGTERM it
writes the counts to $BENCH_SINK_OUT (JSON), so the bench can show the services really
exported every span.  Its CPU is shown in a column of its own: a collector's work, not
the platform's, though here it shares the same two cores.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, int] = {}
        self.names: dict[str, int] = {}  # "service: span name" -> count
        self.metric_exports = 0

    def add_spans(self, request: trace_pb.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "?"
                )
                for scope in resource_spans.scope_spans:
                    self.spans[service] = self.spans.get(service, 0) + len(scope.spans)
                    for span in scope.spans:
                        name = f"{service}: {span.name}"
                        self.names[name] = self.names.get(name, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"spans": dict(self.spans), "names": dict(self.names), "metric_exports": self.metric_exports}


class Traces(trace_grpc.TraceServiceServicer):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def Export(self, request: Any, context: Any) -> trace_pb.ExportTraceServiceResponse:  # noqa: N802
        self.counts.add_spans(request)
        return trace_pb.ExportTraceServiceResponse()


class Metrics(metrics_grpc.MetricsServiceServicer):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def Export(self, request: Any, context: Any) -> metrics_pb.ExportMetricsServiceResponse:  # noqa: N802
        with self.counts.lock:
            self.counts.metric_exports += 1
        return metrics_pb.ExportMetricsServiceResponse()


def main() -> None:
    counts = Counts()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_grpc.add_TraceServiceServicer_to_server(Traces(counts), server)
    metrics_grpc.add_MetricsServiceServicer_to_server(Metrics(counts), server)
    server.add_insecure_port(f"127.0.0.1:{os.environ['BENCH_SINK_PORT']}")
    server.start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    server.stop(grace=2).wait()
    out = os.environ.get("BENCH_SINK_OUT")
    if out:
        Path(out).write_text(json.dumps(counts.as_dict()))


if __name__ == "__main__":
    main()
