"""gRPC server wiring shared by every department: tracing, health, reflection, errors."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.kernel import errors
from services.kernel.grpc_telemetry import ServerTelemetry
from services.kernel.heap import freeze_startup_objects

log = logging.getLogger(__name__)

_STATUS_OF: list[tuple[type[errors.DomainError], grpc.StatusCode]] = [
    (errors.InvalidField, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ConcurrencyConflict, grpc.StatusCode.ABORTED),
]


def status_for(error: errors.DomainError) -> grpc.StatusCode:
    for error_type, code in _STATUS_OF:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.UNKNOWN


@contextmanager
def domain_errors_as_status(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn a refused command into its gRPC status; the message names the field at fault."""
    try:
        yield
    except errors.DomainError as exc:
        if exc.details:
            context.set_trailing_metadata(tuple(exc.details.items()))
        context.abort(status_for(exc), str(exc))


def build_server(
    port: int,
    host: str,
    adders: Sequence[Callable[[grpc.Server], None]],
    service_names: Sequence[str],
    max_workers: int = 256,
) -> tuple[grpc.Server, health.HealthServicer]:
    # Sync gRPC gives each call a thread for its whole life, and a server stream
    # (StreamOffers, WatchTeam) lives as long as a desktop is open: size the pool
    # for every open stream plus headroom, and refuse (RESOURCE_EXHAUSTED) rather
    # than queue calls forever once it is full.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        maximum_concurrent_rpcs=max_workers,
        interceptors=[ServerTelemetry(host, port)],
    )
    for add in adders:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}: the port is taken")
    return server, health_servicer


class Background(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


def run_until_signalled(server: grpc.Server, name: str, address: str, background: Sequence[Background]) -> None:
    """Start the background workers and the server; on SIGTERM/SIGINT stop the server
    (5 s grace for calls in flight), then the workers in reverse order, so the outbox
    relay, started first, stops last and publishes what the last calls accepted."""
    log.debug("froze %d start-up objects out of garbage collection", freeze_startup_objects())
    for worker in background:
        worker.start()
    server.start()
    log.info("%s listening on %s", name, address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    for worker in reversed(background):
        worker.stop()
