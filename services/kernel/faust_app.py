"""Faust application factory and the envelope-consuming agent every projection uses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import faust
from centralino.v1.envelope_pb2 import EventEnvelope
from opentelemetry import trace
from pymongo.errors import PyMongoError

from services.kernel.config import Settings
from services.kernel.envelope import UnknownEventType
from services.kernel.telemetry import context_from_headers

log = logging.getLogger(__name__)

EnvelopeHandler = Callable[[EventEnvelope], object]


def create_app(name: str, settings: Settings) -> faust.App:
    datadir = settings.state_dir / "faust" / settings.consumer_group(name)
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    # `version` is part of every changelog topic and state path: never bump it casually.
    return faust.App(
        settings.consumer_group(name),
        version=1,
        broker=";".join(f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")),
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=3,
        topic_replication_factor=1,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        autodiscover=False,
    )


def envelope_agent(app: faust.App, topic_name: str, name: str, handle: EnvelopeHandler) -> None:
    """Register a Faust agent that feeds each envelope of `topic_name` to `handle`.

    The handler runs in a worker thread (mongoengine is blocking) inside a CONSUMER
    span whose parent is the trace context found in the record headers.
    """
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    tracer = trace.get_tracer(f"centralino.projections.{name}")

    async def consume(stream: faust.StreamT) -> None:
        async for event in stream.events():
            envelope = EventEnvelope.FromString(event.value)
            parent = context_from_headers(event.headers or {})
            attributes = {
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": topic_name,
                "messaging.message.id": envelope.event_id,
                "messaging.consumer.group.name": app.conf.id,
            }
            with tracer.start_as_current_span(
                f"process {topic_name}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
            ):
                await _handle_with_retry(handle, envelope)

    app.agent(topic, name=name)(consume)


async def _handle_with_retry(handle: EnvelopeHandler, envelope: EventEnvelope) -> None:
    """Retry database outages forever (nothing may be skipped); skip only what no retry can fix."""
    delay = 0.5
    while True:
        try:
            await asyncio.to_thread(handle, envelope)
            return
        except UnknownEventType:
            log.warning("skipping event %s of unknown type %s", envelope.event_id, envelope.event_type)
            return
        except PyMongoError:
            log.exception("projection write failed for event %s; retrying in %.1fs", envelope.event_id, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
