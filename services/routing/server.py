"""Runs the routing gRPC server and the router: `python -m services.routing.server`."""

from __future__ import annotations

from centralino.v1 import routing_pb2, routing_pb2_grpc

from services.kernel.config import load_settings
from services.kernel.grpc_server import Background, build_server, run_until_signalled
from services.kernel.telemetry import setup_tracing
from services.routing.bootstrap import bootstrap


def main() -> None:
    settings = load_settings()
    setup_tracing("centralino-routing")
    wiring = bootstrap(settings)
    wiring.router.recover()
    port = settings.grpc_port("routing")
    server, _ = build_server(
        port,
        settings.grpc_host,
        [lambda s: routing_pb2_grpc.add_RoutingServiceServicer_to_server(wiring.servicer, s)],
        [routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name],
        max_workers=settings.grpc_max_workers,
    )
    background: list[Background] = [wiring.relay, wiring.feed, wiring.router]
    run_until_signalled(server, "routing service", f"{settings.grpc_host}:{port}", background)


if __name__ == "__main__":
    main()
