"""The event envelope and the registry of event types.

Event type names are stable strings ("agents.AgentRegistered"), never Python
paths, so code can move without breaking the log.  A payload written at an older
schema version is upcast, step by step, when it is read.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

# An upcaster turns the payload bytes of version N into those of version N+1.
Upcaster = Callable[[bytes], bytes]


log = logging.getLogger(__name__)


class UnknownEventType(KeyError):
    pass


def read_envelope(value: bytes, topic: str, partition: int, offset: int) -> EventEnvelope | None:
    """A Kafka record's envelope; None, with a warning naming the record, for one that is
    not an envelope.  No retry could ever read it, and a consumer retrying it would stop
    for good (a router's agent feed, a projection, a team watch)."""
    try:
        return EventEnvelope.FromString(value)
    except DecodeError:
        log.warning("skipping record %s-%d@%d: not an event envelope", topic, partition, offset)
        return None


@dataclass(frozen=True)
class EventType:
    name: str
    message: type[Message]
    version: int = 1
    upcasters: dict[int, Upcaster] = field(default_factory=dict)  # from-version -> step


class EventRegistry:
    def __init__(self, types: Iterable[EventType] = ()) -> None:
        self._by_name: dict[str, EventType] = {}
        self._by_message: dict[type[Message], EventType] = {}
        for event_type in types:
            self.register(event_type)

    def register(self, event_type: EventType) -> None:
        self._by_name[event_type.name] = event_type
        self._by_message[event_type.message] = event_type

    def type_of(self, payload: Message) -> EventType:
        try:
            return self._by_message[type(payload)]
        except KeyError:
            raise UnknownEventType(type(payload).__name__) from None

    def decode(self, envelope: EventEnvelope) -> Message:
        """The payload as the current message version, upcasting older ones."""
        try:
            event_type = self._by_name[envelope.event_type]
        except KeyError:
            raise UnknownEventType(envelope.event_type) from None
        data = envelope.payload
        for version in range(envelope.schema_version, event_type.version):
            data = event_type.upcasters[version](data)
        message = event_type.message()
        message.ParseFromString(data)
        return message


@dataclass(frozen=True)
class Metadata:
    """Who asked for a change and why: copied onto every event it causes."""

    correlation_id: str
    causation_id: str
    producer: str


def epoch_seconds(timestamp: Timestamp) -> float:
    """A protobuf Timestamp as float epoch seconds (Timestamp.ToSeconds() drops the fraction)."""
    return timestamp.seconds + timestamp.nanos / 1e9


def new_id() -> str:
    return str(uuid.uuid4())


def wrap(
    payload: Message,
    *,
    registry: EventRegistry,
    aggregate_type: str,
    aggregate_id: str,
    sequence: int,
    meta: Metadata,
    occurred_at: datetime | None = None,
) -> EventEnvelope:
    event_type = registry.type_of(payload)
    envelope = EventEnvelope(
        event_id=new_id(),
        event_type=event_type.name,
        schema_version=event_type.version,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        sequence=sequence,
        producer=meta.producer,
        correlation_id=meta.correlation_id,
        causation_id=meta.causation_id,
        payload=payload.SerializeToString(deterministic=True),
    )
    envelope.occurred_at.FromDatetime(occurred_at or datetime.now(UTC))
    return envelope


def cloudevents_headers(envelope: EventEnvelope) -> list[tuple[str, bytes]]:
    """CloudEvents Kafka-binding attributes, so brokers' tools can filter without decoding."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", envelope.event_id.encode()),
        ("ce_type", envelope.event_type.encode()),
        ("ce_source", envelope.producer.encode()),
        ("ce_time", envelope.occurred_at.ToJsonString().encode()),
        ("ce_subject", envelope.aggregate_id.encode()),
        ("content-type", b"application/protobuf"),
    ]
