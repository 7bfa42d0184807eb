"""Runs the routing gRPC server and the router: `python -m services.routing.server`."""

from __future__ import annotations

import logging
import signal
import threading

from centralino.v1 import routing_pb2, routing_pb2_grpc

from services.kernel.config import load_settings
from services.kernel.grpc_server import build_server
from services.kernel.telemetry import setup_tracing
from services.routing.bootstrap import bootstrap

log = logging.getLogger("centralino.routing")


def main() -> None:
    settings = load_settings()
    setup_tracing("centralino-routing")
    wiring = bootstrap(settings)
    open_interactions = wiring.router.recover()
    log.info("recovered %d open interactions from the routing log", open_interactions)
    port = settings.grpc_port("routing")
    server, _ = build_server(
        port,
        settings.grpc_host,
        [lambda s: routing_pb2_grpc.add_RoutingServiceServicer_to_server(wiring.servicer, s)],
        [routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name],
        max_workers=settings.grpc_max_workers,
    )
    wiring.relay.start()
    wiring.feed.start()
    wiring.router.start()
    server.start()
    log.info("routing service listening on %s:%d", settings.grpc_host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    wiring.router.stop()
    wiring.feed.stop()
    wiring.relay.stop()


if __name__ == "__main__":
    main()
