"""Runs the agents gRPC server: `python -m services.agents.server`."""

from __future__ import annotations

from centralino.v1 import agents_pb2, agents_pb2_grpc

from services.agents.bootstrap import bootstrap
from services.kernel.config import load_settings
from services.kernel.grpc_server import build_server, run_until_signalled
from services.kernel.telemetry import setup_tracing


def main() -> None:
    settings = load_settings()
    setup_tracing("centralino-agents")
    wiring = bootstrap(settings)
    port = settings.grpc_port("agents")
    server, _ = build_server(
        port,
        settings.grpc_host,
        [lambda s: agents_pb2_grpc.add_AgentsServiceServicer_to_server(wiring.servicer, s)],
        [agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].full_name],
        max_workers=settings.grpc_max_workers,
    )
    run_until_signalled(server, "agents service", f"{settings.grpc_host}:{port}", [wiring.relay, wiring.hub])


if __name__ == "__main__":
    main()
