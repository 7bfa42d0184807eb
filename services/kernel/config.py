"""All configuration, read from environment variables in this one place.

Defaults are safe for a laptop: everything on 127.0.0.1, data under `.stack/`.
`namespace` prefixes topics, consumer groups and the database name so that tests
(and several deployments sharing one cluster) never see each other's data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

DEPARTMENTS = ("routing", "agents", "crm", "training", "loyalty")
_DEFAULT_GRPC_PORTS = {"routing": 50051, "agents": 50052, "crm": 50053, "training": 50054, "loyalty": 50055}


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    mongo_url: str = "mongodb://127.0.0.1:27017/"
    namespace: str = "centralino"
    grpc_host: str = "127.0.0.1"
    state_dir: Path = Path(".stack")
    relay_interval_s: float = 1.0
    # How long event topics keep their records (ms; -1: forever).  Projections are rebuilt,
    # and a router without a checkpoint starts, by reading a topic from its beginning.
    event_retention_ms: int = -1
    # The contact center's time zone: "today", shifts and midnight splits follow it.
    timezone: str = "UTC"
    # Routing: a JSON file overriding/adding queues, and the service-level formula
    # ("answered", "answered_and_abandoned" or "left_queue"; see routing/domain/stats.py).
    routing_queues_file: str = ""
    service_level_variant: str = "answered_and_abandoned"
    # How long the router keeps a closed interaction in memory (late retries and
    # desktops reconnecting answer from memory; after it, from the event store).
    routing_closed_retention_s: float = 900.0
    # How often the router saves a checkpoint: a restart reads the routing log from the
    # last one on, instead of the whole log.
    routing_checkpoint_s: float = 10.0
    # Threads per gRPC server: one per open stream (agent desktops) plus headroom.
    grpc_max_workers: int = 512
    # How long a projection gathers events before writing its read models: the most a
    # read model trails its topic when the topic is busy.  Longer windows fold more
    # events into each document write (one per agent per batch).
    projection_batch_s: float = 0.25
    # How much a projection worker lowers its own CPU priority (nice): read models are
    # background work, and on a shared host the services answering calls go first.
    projection_nice: int = 10
    # Observability.  Exporters are named by the standard OpenTelemetry variables,
    # with the specification's default ("otlp"); where each exporter sends to
    # (OTEL_EXPORTER_OTLP_*, OTEL_EXPORTER_ZIPKIN_*) is read by the exporter itself.
    traces_exporter: str = "otlp"
    metrics_exporter: str = "otlp"
    otlp_protocol: str = "grpc"  # or "http/protobuf"
    log_format: str = "json"  # or "text" for a human at a terminal
    log_level: str = "INFO"
    # At exit, how long buffered telemetry may hold the process up when its
    # backend is slow or gone (a stopped service must stop promptly).
    telemetry_exit_timeout_s: float = 2.0

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def mongo_db(self) -> str:
        """Read models."""
        return self.namespace

    @property
    def events_db(self) -> str:
        """The event store and its commit log: a database of their own, because FerretDB's
        SQLite backend keeps one file, with one write lock, per database."""
        return f"{self.namespace}_events"

    @property
    def databases(self) -> tuple[str, str]:
        return self.mongo_db, self.events_db

    def topic(self, department: str) -> str:
        """The event topic of a department; records are keyed by aggregate id."""
        return f"{self.namespace}.{department}.events"

    def consumer_group(self, projection: str) -> str:
        return f"{self.namespace}-{projection}"

    def grpc_port(self, department: str, environ: Mapping[str, str] | None = None) -> int:
        env = os.environ if environ is None else environ
        return int(env.get(f"{department.upper()}_GRPC_PORT", _DEFAULT_GRPC_PORTS[department]))

    def grpc_target(self, department: str) -> str:
        return f"{self.grpc_host}:{self.grpc_port(department)}"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    defaults = Settings()
    return Settings(
        kafka_bootstrap=env.get("KAFKA_BOOTSTRAP", defaults.kafka_bootstrap),
        mongo_url=env.get("MONGO_URL", defaults.mongo_url),
        namespace=env.get("CENTRALINO_NAMESPACE", defaults.namespace),
        grpc_host=env.get("CENTRALINO_GRPC_HOST", defaults.grpc_host),
        state_dir=Path(env.get("CENTRALINO_STATE_DIR", str(defaults.state_dir))),
        relay_interval_s=float(env.get("CENTRALINO_RELAY_INTERVAL_S", defaults.relay_interval_s)),
        event_retention_ms=int(env.get("CENTRALINO_EVENT_RETENTION_MS", defaults.event_retention_ms)),
        timezone=env.get("CENTRALINO_TIMEZONE", defaults.timezone),
        routing_queues_file=env.get("CENTRALINO_ROUTING_QUEUES", defaults.routing_queues_file),
        service_level_variant=env.get("CENTRALINO_SERVICE_LEVEL_VARIANT", defaults.service_level_variant),
        routing_closed_retention_s=float(
            env.get("CENTRALINO_ROUTING_CLOSED_RETENTION_S", defaults.routing_closed_retention_s)
        ),
        routing_checkpoint_s=float(env.get("CENTRALINO_ROUTING_CHECKPOINT_S", defaults.routing_checkpoint_s)),
        grpc_max_workers=int(env.get("CENTRALINO_GRPC_MAX_WORKERS", defaults.grpc_max_workers)),
        projection_batch_s=float(env.get("CENTRALINO_PROJECTION_BATCH_S", defaults.projection_batch_s)),
        projection_nice=int(env.get("CENTRALINO_PROJECTION_NICE", defaults.projection_nice)),
        traces_exporter=env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or defaults.traces_exporter,
        metrics_exporter=env.get("OTEL_METRICS_EXPORTER", "").strip().lower() or defaults.metrics_exporter,
        otlp_protocol=env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip().lower() or defaults.otlp_protocol,
        log_format=env.get("CENTRALINO_LOG_FORMAT", defaults.log_format).strip().lower(),
        log_level=env.get("CENTRALINO_LOG_LEVEL", defaults.log_level).strip().upper(),
        telemetry_exit_timeout_s=float(
            env.get("CENTRALINO_TELEMETRY_EXIT_TIMEOUT_S", defaults.telemetry_exit_timeout_s)
        ),
    )
