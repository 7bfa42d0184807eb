"""Runs the agents projections (Faust): `python -m services.agents.worker`."""

from __future__ import annotations

import os
import sys

from services.agents import adapters, projections
from services.kernel import kafka, mongo
from services.kernel.config import load_settings
from services.kernel.faust_app import create_app
from services.kernel.heap import freeze_startup_objects
from services.kernel.telemetry import setup_tracing


def main() -> None:
    settings = load_settings()
    setup_tracing("centralino-agents-projections")
    mongo.connect(settings)
    adapters.ensure_indexes()
    # A consumer that subscribes before its topic exists ignores it until the next
    # metadata refresh (minutes), so the topics are created first.
    kafka.ensure_topics(
        settings.kafka_bootstrap, projections.source_topics(settings), retention_ms=settings.event_retention_ms
    )
    app = create_app("agents-projections", settings)
    projections.register(app, settings)
    if len(sys.argv) == 1:
        # No web server: projections expose nothing over HTTP, and several workers share a host.
        sys.argv += ["worker", "--loglevel", "info", "--without-web"]
    freeze_startup_objects()
    os.nice(max(settings.projection_nice, 0))  # only ever lower: raising needs privileges
    app.main()


if __name__ == "__main__":
    main()
