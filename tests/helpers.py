"""Small waiting and Kafka-reading helpers shared by the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from services.kernel.envelope import EventRegistry
from services.kernel.eventstore import EventStore

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout_s: float = 60.0, interval_s: float = 0.2) -> T:
    """Poll `probe` until it returns something truthy; fail with a clear message otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s: {getattr(probe, '__name__', probe)}")
        time.sleep(interval_s)


def read_topic(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout_s: float = 30.0,
    until: Callable[[list[ConsumerRecord]], bool] | None = None,
) -> list[ConsumerRecord]:
    """Read every partition of a topic from the beginning until `expected` records arrived
    (or, given `until`, until it holds for the records read).

    Waits for the topic to exist first: the service creates it when it first publishes.
    """
    done = until or (lambda records: len(records) >= expected)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    deadline = time.monotonic() + timeout_s
    records: list[ConsumerRecord] = []
    try:
        partitions = eventually(lambda: consumer.partitions_for_topic(topic), timeout_s)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        while not done(records) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def event_log(aggregate_id: str, registry: EventRegistry) -> list[tuple[str, Any]]:
    """(event type, decoded payload) of every stored event of an aggregate, oldest first."""
    return [(e.event_type, registry.decode(e)) for e in EventStore().load(aggregate_id)]
