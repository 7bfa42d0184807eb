"""MongoDB connection (mongoengine) for any MongoDB-wire server, FerretDB included, and its tracing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import mongoengine
from opentelemetry import trace
from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.semconv.attributes.db_attributes import (
    DB_COLLECTION_NAME,
    DB_NAMESPACE,
    DB_OPERATION_BATCH_SIZE,
    DB_OPERATION_NAME,
    DB_SYSTEM_NAME,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pymongo import MongoClient
from pymongo.monitoring import CommandListener, CommandStartedEvent

from services.kernel.config import Settings

EVENTS_ALIAS = "events"
TRACER_NAME = "centralino.mongo"


def connect(settings: Settings, event_listeners: Sequence[CommandListener] = ()) -> MongoClient:
    """Both databases (read models, event store); `event_listeners` watch every command (tests count them)."""
    # Indexes are created explicitly by `ensure_indexes()` at start-up, not on first
    # use, so a slow index build never hides inside a request.
    client = mongoengine.connect(
        db=settings.mongo_db,
        host=settings.mongo_url,
        alias="default",
        uuidRepresentation="standard",
        tz_aware=True,
        serverSelectionTimeoutMS=5000,
        event_listeners=list(event_listeners),
    )
    # Same server, same client (mongoengine shares it for one host), the event store's database.
    mongoengine.register_connection(
        EVENTS_ALIAS,
        db=settings.events_db,
        host=settings.mongo_url,
        uuidRepresentation="standard",
        tz_aware=True,
        serverSelectionTimeoutMS=5000,
        event_listeners=list(event_listeners),
    )
    return client


def drop_databases(client: MongoClient, settings: Settings) -> None:
    for name in settings.databases:
        client.drop_database(name)


def disconnect() -> None:
    mongoengine.disconnect(alias=EVENTS_ALIAS)
    mongoengine.disconnect(alias="default")


def instrument(tracer_provider: TracerProvider | None = None) -> None:
    """Trace every MongoDB command as a CLIENT span, child of the span that issued it.

    Registers a pymongo command listener, which only clients created afterwards
    get: call before `connect`.  Statements are not captured (they hold personal
    data); spans are named `{operation} {collection}` as the conventions ask.
    """
    instrumentor = PymongoInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracer_provider, request_hook=_describe, capture_statement=False)


def _describe(span: Span, event: CommandStartedEvent) -> None:
    if not span.is_recording():
        return
    target = event.command.get(event.command_name)
    collection = target if isinstance(target, str) else event.command.get("collection")
    attributes = {
        DB_SYSTEM_NAME: "mongodb",
        DB_OPERATION_NAME: event.command_name,
        DB_NAMESPACE: event.database_name,
    }
    if isinstance(collection, str):
        attributes[DB_COLLECTION_NAME] = collection
        span.update_name(f"{event.command_name} {collection}")
    else:
        span.update_name(event.command_name)
    span.set_attributes(attributes)


@contextmanager
def shared_command_spans(
    parents: Sequence[Span], operation: str, collection: str, database: str, tracer: trace.Tracer | None = None
) -> Iterator[None]:
    """Inside, one database call (a batch of writes) serves many traces: each parent gets
    a CLIENT span of its own covering that call, named as pymongo's would be, and
    pymongo's own span for the call, which could sit in only one trace, is left out."""
    tracer = tracer or trace.get_tracer(TRACER_NAME)
    attributes: dict[str, str | int] = {
        DB_SYSTEM_NAME: "mongodb",
        DB_OPERATION_NAME: operation,
        DB_NAMESPACE: database,
        DB_COLLECTION_NAME: collection,
        DB_OPERATION_BATCH_SIZE: len(parents),
    }
    spans = [
        tracer.start_span(
            f"{operation} {collection}",
            context=trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        for parent in parents
    ]
    try:
        with suppress_instrumentation():
            yield
    except Exception as exc:
        for span in spans:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
        raise
    finally:
        for span in spans:
            span.end()
