"""gRPC tracing and metrics, server and client side, by OpenTelemetry's RPC conventions.

Why not opentelemetry-instrumentation-grpc's interceptors: they copy the status
*details* into span statuses and exception events, and our details name the
aggregate at fault (agent ids are people's names); they mark a refused command
(INVALID_ARGUMENT...) as a server error, which the conventions reserve for the
server's own faults; and they record no metrics.  These interceptors make one
span and one `rpc.*.call.duration` measurement per call from the same clock,
name both by `rpc.method` ("centralino.v1.AgentsService/RegisterAgent") and
record only the status code: no message contents, metadata or peer addresses.

Health checks and reflection are not traced: probes would bury the journeys.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.kernel import metrics as kernel_metrics
from services.kernel.telemetry import headers_for

log = logging.getLogger(__name__)

TRACER_NAME = "centralino.grpc"
UNTRACED_PREFIXES = ("grpc.health.v1.Health/", "grpc.reflection.")
# Statuses that are the server's fault; the others are the caller's (conventions: RPC spans).
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _split_target(target: str) -> tuple[str, int | None]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return target, None
    return host.strip("[]"), int(port)


def _address_attributes(host: str, port: int | None) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {"server.address": host}
    if port is not None:
        attributes["server.port"] = port
    return attributes


def _outcome_attributes(code: grpc.StatusCode) -> dict[str, str]:
    attributes = {"rpc.response.status_code": code.name}
    if code != grpc.StatusCode.OK:
        attributes["error.type"] = code.name
    return attributes


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool], Behavior]) -> grpc.RpcMethodHandler:
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    return factory(  # type: ignore[operator]
        wrap(behavior, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ServerTelemetry(grpc.ServerInterceptor):
    """SERVER span + `rpc.server.call.duration` per call, continuing the caller's trace."""

    def __init__(
        self,
        host: str,
        port: int,
        tracer_provider: trace.TracerProvider | None = None,
        meter: Meter | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self._duration = kernel_metrics.instruments(kernel_metrics.RpcMetrics, meter).server_duration
        self._address = _address_attributes(host, port)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = str(details.method).lstrip("/")
        if handler is None or method.startswith(UNTRACED_PREFIXES):
            return handler
        metadata = {key: value for key, value in (details.invocation_metadata or ()) if isinstance(value, str)}

        def wrap(behavior: Behavior, response_streaming: bool) -> Behavior:
            if response_streaming:
                return lambda request, context: self._stream(behavior, request, context, method, metadata)
            return lambda request, context: self._unary(behavior, request, context, method, metadata)

        return _wrap_handler(handler, wrap)

    def _start(self, method: str, metadata: dict[str, str]) -> Any:
        attributes = {"rpc.system.name": "grpc", "rpc.method": method, **self._address}
        return self._tracer.start_as_current_span(
            method,
            context=propagate.extract(metadata),
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,  # exception messages may hold request data
            set_status_on_exception=False,
        )

    def _unary(
        self, behavior: Behavior, request: Any, context: grpc.ServicerContext, method: str, metadata: dict[str, str]
    ) -> Any:
        started = time.perf_counter()
        with self._start(method, metadata) as span:
            crashed: BaseException | None = None
            try:
                return behavior(request, context)
            except BaseException as exc:
                crashed = exc
                raise
            finally:
                self._finish(span, method, context, started, crashed)

    def _stream(
        self, behavior: Behavior, request: Any, context: grpc.ServicerContext, method: str, metadata: dict[str, str]
    ) -> Iterator[Any]:
        started = time.perf_counter()
        with self._start(method, metadata) as span:
            crashed: BaseException | None = None
            try:
                yield from behavior(request, context)
            except BaseException as exc:
                crashed = exc
                raise
            finally:
                self._finish(span, method, context, started, crashed)

    def _finish(
        self,
        span: trace.Span,
        method: str,
        context: grpc.ServicerContext,
        started: float,
        crashed: BaseException | None,
    ) -> None:
        # `abort()` sets the code and raises a bare Exception; anything else is a bug (UNKNOWN).
        code = context.code() or (grpc.StatusCode.UNKNOWN if crashed is not None else grpc.StatusCode.OK)
        outcome = _outcome_attributes(code)
        if crashed is not None and type(crashed) is not Exception and not isinstance(crashed, GeneratorExit):
            outcome["error.type"] = type(crashed).__qualname__
        span.set_attributes(outcome)
        if code in SERVER_FAULTS:
            span.set_status(Status(StatusCode.ERROR, code.name))
        self._duration.record(
            time.perf_counter() - started, {"rpc.system.name": "grpc", "rpc.method": method, **outcome}
        )
        if code in SERVER_FAULTS:
            log.warning("%s failed: %s", method, outcome.get("error.type", code.name))
        elif code != grpc.StatusCode.OK:
            log.info("%s refused: %s", method, code.name)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class ClientTelemetry(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """CLIENT span + `rpc.client.call.duration` per call; the span's context goes out as `traceparent`."""

    def __init__(
        self, target: str, tracer_provider: trace.TracerProvider | None = None, meter: Meter | None = None
    ) -> None:
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self._duration = kernel_metrics.instruments(kernel_metrics.RpcMetrics, meter).client_duration
        self._address = _address_attributes(*_split_target(target))

    def _call(self, continuation: Callable[[Any, Any], Any], details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        method = method.lstrip("/")
        attributes = {"rpc.system.name": "grpc", "rpc.method": method, **self._address}
        span = self._tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attributes)
        started = time.perf_counter()
        metadata = [*(details.metadata or ()), *headers_for(span).items()]
        details = _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                outcome = continuation(details, request)
        except Exception as exc:
            self._finish(span, method, grpc.StatusCode.UNKNOWN, started, type(exc).__qualname__)
            raise
        # Called at once for a finished call, later for a future or a stream.
        outcome.add_done_callback(lambda call: self._finish(span, method, call.code(), started))
        return outcome

    def _finish(
        self, span: trace.Span, method: str, code: grpc.StatusCode | None, started: float, error: str = ""
    ) -> None:
        code = code or grpc.StatusCode.UNKNOWN
        outcome = _outcome_attributes(code)
        if error:
            outcome["error.type"] = error
        span.set_attributes(outcome)
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        self._duration.record(
            time.perf_counter() - started, {"rpc.system.name": "grpc", "rpc.method": method, **outcome}
        )
        span.end()

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return self._call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return self._call(continuation, client_call_details, request_iterator)


def instrumented_channel(
    target: str,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter: Meter | None = None,
) -> grpc.Channel:
    """An insecure channel to `target` whose calls are traced and measured (clients, demo, tests)."""
    return grpc.intercept_channel(
        grpc.insecure_channel(target), ClientTelemetry(target, tracer_provider=tracer_provider, meter=meter)
    )
