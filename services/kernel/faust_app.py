"""Faust application factory and the envelope-consuming agent every projection uses."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime

import faust
from centralino.v1.envelope_pb2 import EventEnvelope
from faust.types import TP
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.kernel import logs, metrics
from services.kernel.config import Settings
from services.kernel.envelope import UnknownEventType
from services.kernel.telemetry import context_from_headers

log = logging.getLogger(__name__)

EnvelopeHandler = Callable[[EventEnvelope], object]
# How often an idle or stuck consumer re-reads its partitions' high watermarks.
LAG_REFRESH_S = 5.0
_LAGS: weakref.WeakKeyDictionary[faust.App, metrics.ConsumerLag] = weakref.WeakKeyDictionary()


def create_app(name: str, settings: Settings) -> faust.App:
    datadir = settings.state_dir / "faust" / settings.consumer_group(name)
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    # `version` is part of every changelog topic and state path: never bump it casually.
    app = faust.App(
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
        # The worker resets logging when it starts; this keeps our structured handler.
        **logs.faust_logging(),
    )
    _watch_consumer_lag(app)
    return app


def _watch_consumer_lag(app: faust.App) -> None:
    """Report `centralino.kafka.consumer.lag` for every partition the app is assigned.

    Updated as events are processed (see `envelope_agent`) and, so that an idle
    or stuck consumer still reports a growing lag, on a timer.
    """
    lag = metrics.ConsumerLag(app.conf.id)
    _LAGS[app] = lag
    metrics.CONSUMER_LAG.add(lag.observe)

    @app.timer(LAG_REFRESH_S, name=f"{app.conf.id}.consumer-lag")
    async def refresh() -> None:
        assigned = app.consumer.assignment()
        highwaters = await app.consumer.highwaters(*assigned) if assigned else {}
        lag.refreshed(
            {(tp.topic, tp.partition): (highwaters.get(tp), await app.consumer.position(tp)) for tp in assigned}
        )


def _highwater(app: faust.App, tp: TP) -> int | None:
    try:
        return app.consumer.highwater(tp)
    except Exception:  # not assigned any more (a rebalance): the timer catches up
        return None


def envelope_agent(app: faust.App, topic_name: str, name: str, handle: EnvelopeHandler) -> None:
    """Register a Faust agent that feeds each envelope of `topic_name` to `handle`.

    A plain handler runs in a worker thread (mongoengine is blocking); a coroutine
    handler runs on the loop (to use Faust tables) and offloads its own blocking
    work.  Either runs inside a CONSUMER
    span whose parent is the PRODUCER span named in the record headers, so its
    MongoDB writes appear as that span's children in the journey's trace.
    """
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    tracer = trace.get_tracer(f"centralino.projections.{name}")
    instruments = metrics.instruments(metrics.ProjectionMetrics)
    group = app.conf.id
    lag = _LAGS.get(app)
    if lag is not None:
        lag.topics.add(topic_name)

    async def consume(stream: faust.StreamT) -> None:
        async for event in stream.events():
            envelope = EventEnvelope.FromString(event.value)
            message = event.message
            common = {
                "messaging.system": "kafka",
                "messaging.operation.name": "process",
                "messaging.destination.name": topic_name,
                "messaging.consumer.group.name": group,
                "centralino.projection.name": name,
            }
            attributes = {
                **common,
                "messaging.operation.type": "process",
                "messaging.message.id": envelope.event_id,
                "messaging.destination.partition.id": str(message.partition),
                "messaging.kafka.offset": message.offset,
                "cloudevents.event_id": envelope.event_id,
                "cloudevents.event_type": envelope.event_type,
                "cloudevents.event_source": envelope.producer,
            }
            started = time.perf_counter()
            with tracer.start_as_current_span(
                f"process {topic_name}",
                context=context_from_headers(event.headers or {}),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
            ) as span:
                outcome = await _handle_with_retry(handle, envelope)
                if outcome:
                    span.set_attribute("error.type", outcome)
                    span.set_status(Status(StatusCode.ERROR, outcome))
            measured = {**common, **({"error.type": outcome} if outcome else {})}
            instruments.consumed.add(1, measured)
            instruments.process_duration.record(time.perf_counter() - started, measured)
            if not outcome:
                occurred = envelope.occurred_at.ToDatetime(tzinfo=UTC)
                instruments.projection_lag.record(max((datetime.now(UTC) - occurred).total_seconds(), 0.0), common)
            if lag is not None:
                lag.processed(message.topic, message.partition, message.offset + 1, _highwater(app, message.tp))

    app.agent(topic, name=name)(consume)


async def _handle_with_retry(handle: EnvelopeHandler, envelope: EventEnvelope) -> str:
    """Retry database outages forever (nothing may be skipped); skip only what no retry can fix.

    Returns "" when handled, else why the event was skipped.
    """
    delay = 0.5
    while True:
        try:
            if inspect.iscoroutinefunction(handle):
                await handle(envelope)  # async handlers use Faust tables on the loop themselves
            else:
                await asyncio.to_thread(handle, envelope)
            return ""
        except UnknownEventType:
            log.warning("skipping event %s of unknown type %s", envelope.event_id, envelope.event_type)
            return UnknownEventType.__name__
        except Exception:
            # Anything else (database outage, a bug fixed by a redeploy) is retried, never
            # skipped: moving on would lose the event, while a stuck partition shows in the lag.
            log.exception("projection failed for event %s; retrying in %.1fs", envelope.event_id, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
