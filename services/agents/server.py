"""Runs the agents gRPC server: `python -m services.agents.server`."""

from __future__ import annotations

import logging
import signal
import threading

from centralino.v1 import agents_pb2, agents_pb2_grpc

from services.agents.bootstrap import bootstrap
from services.kernel.config import load_settings
from services.kernel.grpc_server import build_server
from services.kernel.telemetry import setup_tracing

log = logging.getLogger("centralino.agents")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings()
    setup_tracing("centralino-agents")
    wiring = bootstrap(settings)
    servicer = wiring.servicer
    port = settings.grpc_port("agents")
    server, _ = build_server(
        port,
        settings.grpc_host,
        [lambda s: agents_pb2_grpc.add_AgentsServiceServicer_to_server(servicer, s)],
        [agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].full_name],
        max_workers=settings.grpc_max_workers,
    )
    wiring.relay.start()
    wiring.hub.start()
    server.start()
    log.info("agents service listening on %s:%d", settings.grpc_host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    wiring.relay.stop()  # publishes what the last requests accepted
    wiring.hub.stop()


if __name__ == "__main__":
    main()
