"""Kafka producer: idempotent, acks=all, keyed by aggregate id, trace context in headers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.producer.future import RecordMetadata
from kafka.structs import TopicPartition

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


def make_producer(bootstrap: str, client_id: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,  # broker drops retried duplicates; per-partition order is kept
        linger_ms=2,
        retries=2**31 - 1,
        request_timeout_ms=10_000,
        delivery_timeout_ms=30_000,
    )


def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int = 3) -> None:
    """Create event topics up front (auto-creation would give them broker defaults)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="centralino-admin")
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent starter created it first
                admin.create_topics(missing)
    finally:
        admin.close()


def send_all(
    producer: KafkaProducer, records: Sequence[tuple[str, bytes, bytes, Headers]], timeout_s: float
) -> list[RecordMetadata]:
    """Send (topic, key, value, headers) records and wait until every one is acknowledged.

    Returns where each record landed (partition, offset), in the order given.
    """
    futures = [producer.send(topic, key=key, value=value, headers=headers) for topic, key, value, headers in records]
    producer.flush(timeout=timeout_s)
    return [future.get(timeout=timeout_s) for future in futures]  # raises the delivery error, if any


def whole_topic_consumer(
    bootstrap: str, topic: str
) -> tuple[KafkaConsumer, dict[TopicPartition, int], dict[TopicPartition, int]]:
    """A consumer outside any group, assigned every partition of `topic`, with the
    partitions' current beginning and end offsets resolved now (a lazy seek would
    resolve at the first poll, after records a caller may already be waiting for).
    The caller seeks to whichever it needs."""
    ensure_topics(bootstrap, [topic])
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    return consumer, consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
