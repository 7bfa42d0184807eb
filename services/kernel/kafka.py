"""Kafka: the event producer (idempotent, acks=all, keyed by aggregate id, trace context
in headers), topic creation and whole-topic consumers.

Events are produced with librdkafka (confluent-kafka): kafka-python's send path is pure
Python, about 0.14 ms of CPU per record against 0.04 (`bench/kafka_producers.py`), and
the outbox relays send every event of the platform.  The whole-topic readers (the
router's agent feed, the team watch) read with librdkafka too: they see every agent
event, and kafka-python's fetch path cost the router about a sixth of its CPU.  Admin
stays on kafka-python, but for librdkafka's incremental change of a topic's settings;
the projections read through Faust (aiokafka).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
Record = tuple[str, bytes, bytes, Headers]  # topic, key, value, headers


class BrokerUnavailable(Exception):
    """No broker answered, or records were not acknowledged in time."""


@dataclass(frozen=True)
class Landed:
    """Where a record was written."""

    partition: int
    offset: int


class EventProducer:
    """Sends batches of records and waits until the broker has acknowledged each one."""

    def __init__(self, bootstrap: str, client_id: str, connect_timeout_s: float = 5.0) -> None:
        self.client_id = client_id
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": client_id,
                "acks": "all",
                "enable.idempotence": True,  # broker drops retried duplicates; per-partition order is kept
                "linger.ms": 2,
                "request.timeout.ms": 10_000,
                "message.timeout.ms": 30_000,  # delivery timeout, retries included
                # The Java client's partitioner (kafka-python's and aiokafka's too): an
                # aggregate's events keep landing on the partition they always did.
                "partitioner": "murmur2_random",
            },
            logger=logging.getLogger("librdkafka"),
        )
        try:  # fail now, as kafka-python did, rather than at the first delivery timeout
            self._producer.list_topics(timeout=connect_timeout_s)
        except KafkaException as exc:
            raise BrokerUnavailable(f"no Kafka broker answered at {bootstrap}: {exc}") from exc

    def send_all(self, records: Sequence[Record], timeout_s: float) -> list[Landed]:
        """Send the records; returns where each landed, in the order given, once all are
        acknowledged.  Raises BrokerUnavailable if some are not within `timeout_s`, or the
        first delivery error."""
        outcomes: list[Landed | KafkaError | None] = [None] * len(records)

        def delivered_at(index: int) -> Callable[[KafkaError | None, Message], None]:
            def delivered(error: KafkaError | None, message: Message) -> None:
                outcomes[index] = error or Landed(message.partition() or 0, message.offset() or 0)

            return delivered

        for index, (topic, key, value, headers) in enumerate(records):
            self._produce(topic, key, value, headers, delivered_at(index))
        left = self._producer.flush(timeout_s)
        if left:
            raise BrokerUnavailable(f"{left} of {len(records)} records not acknowledged within {timeout_s:.0f}s")
        for outcome in outcomes:
            if isinstance(outcome, KafkaError):
                raise KafkaException(outcome)
        return [outcome for outcome in outcomes if isinstance(outcome, Landed)]

    def _produce(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        headers: Headers,
        callback: Callable[[KafkaError | None, Message], None],
    ) -> None:
        sent: list[tuple[str, str | bytes | None]] = list(headers)
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=sent, on_delivery=callback)
                return
            except BufferError:  # librdkafka's queue is full: let deliveries drain it
                self._producer.poll(0.1)

    def close(self, timeout_s: float) -> None:
        self._producer.flush(timeout_s)


def make_producer(bootstrap: str, client_id: str) -> EventProducer:
    return EventProducer(bootstrap, client_id)


KEEP_FOREVER = -1


def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int = 3, retention_ms: int = KEEP_FOREVER) -> None:
    """Create event topics up front (auto-creation would give them broker defaults), and
    make them keep their records for `retention_ms` (forever by default).

    Projections are rebuilt, and a router without a checkpoint starts, by reading a topic
    from its beginning: with the broker's default retention (7 days) an agent registered
    earlier would be missing from both.  Topics made by earlier releases are set too,
    with an incremental change that leaves their other settings as they are."""
    configs = {"retention.ms": str(retention_ms)}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="centralino-admin")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(t, num_partitions=partitions, replication_factor=1, topic_configs=configs)
            for t in topics
            if t not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent starter created it first
                admin.create_topics(missing)
    finally:
        admin.close()
    _set_topic_configs(bootstrap, [t for t in topics if t in existing], configs)


def _set_topic_configs(bootstrap: str, topics: Sequence[str], configs: Mapping[str, str]) -> None:
    if not topics:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap, "client.id": "centralino-admin"})
    entries = [ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET) for name, value in configs.items()]
    resources = [ConfigResource("topic", topic, incremental_configs=entries) for topic in topics]
    for future in admin.incremental_alter_configs(resources).values():
        future.result(timeout=10)


def topic_config(bootstrap: str, topic: str, name: str) -> str:
    """One setting of a topic, as the broker has it."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "client.id": "centralino-admin"})
    [future] = admin.describe_configs([ConfigResource("topic", topic)]).values()
    return str(future.result(timeout=10)[name].value)


class Consumed(NamedTuple):
    """A record read by a TopicReader."""

    topic: str
    partition: int
    offset: int
    value: bytes


class TopicReader:
    """Reads every partition of one topic outside any consumer group, from offsets the
    caller chooses (librdkafka; nothing is committed, no group is joined).

    The partitions' beginning and end offsets are resolved when it is made (a lazy seek
    would resolve at the first poll, after records a caller may already be waiting for).
    A broker outage does not end it: librdkafka reconnects and goes on from where it was.
    """

    def __init__(self, bootstrap: str, topic: str, client_id: str, timeout_s: float = 10.0) -> None:
        ensure_topics(bootstrap, [topic])
        self.topic = topic
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": client_id,
                # Required by librdkafka; never joined (assign, not subscribe) and never committed to.
                "group.id": f"{client_id}-unjoined",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "socket.nagle.disable": True,
            },
            logger=logging.getLogger("librdkafka"),
        )
        try:
            found = self._consumer.list_topics(topic, timeout=timeout_s).topics[topic]
            if found.error is not None:
                raise KafkaException(found.error)
            partitions = sorted(found.partitions)
            marks = {p: self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout_s) for p in partitions}
        except BaseException:
            self._consumer.close()
            raise
        self.beginnings = {p: low for p, (low, _) in marks.items()}
        self.ends = {p: high for p, (_, high) in marks.items()}
        self._next: dict[int, int] = {}

    def start_at(self, offsets: Mapping[int, int]) -> None:
        """Read each partition from the given offset on."""
        self._next = dict(offsets)
        self._consumer.assign([TopicPartition(self.topic, p, offset) for p, offset in offsets.items()])

    def poll(self, timeout_s: float, max_records: int = 500) -> list[Consumed]:
        """The next records, in order per partition (none on timeout): waits for the first
        one, then takes those already fetched without waiting.  One `consume(n, timeout)`
        would hold what has arrived until n records did, or the timeout passed (the
        router's picture of the agents trailed them by about 60 ms that way)."""
        messages = self._consumer.consume(1, timeout_s)
        if messages and max_records > 1:
            messages += self._consumer.consume(max_records - 1, 0)
        records = []
        for message in messages:
            error = message.error()
            if error is None:
                partition, offset = message.partition() or 0, message.offset() or 0
                records.append(Consumed(self.topic, partition, offset, message.value() or b""))
                self._next[partition] = offset + 1
            elif error.fatal():
                raise KafkaException(error)
            else:  # transient (broker away, ...): librdkafka retries on its own
                log.warning("reading %s: %s", self.topic, error)
        return records

    def position(self, partition: int) -> int:
        """The offset of the next record to be read from `partition`."""
        return self._next[partition]

    def close(self) -> None:
        self._consumer.close()
