"""Event topics on the real broker: they keep their records, whoever created them."""

from __future__ import annotations

import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from services.kernel import kafka
from services.kernel.config import Settings

pytestmark = pytest.mark.integration

WEEK_MS = "604800000"  # the broker's default retention
TEN_MB = "10485760"


def test_event_topics_keep_their_records_and_topics_made_before_are_set_too(mongo: Settings) -> None:
    bootstrap = mongo.kafka_bootstrap
    fresh, older = mongo.topic("fresh"), mongo.topic("older")
    kafka.ensure_topics(bootstrap, [fresh])
    assert kafka.topic_config(bootstrap, fresh, "retention.ms") == "-1"

    # As an earlier release left it: the broker's default retention, and a setting an operator chose.
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        configs = {"retention.ms": WEEK_MS, "segment.bytes": TEN_MB}
        admin.create_topics([NewTopic(older, num_partitions=3, replication_factor=1, topic_configs=configs)])
    finally:
        admin.close()
    assert kafka.topic_config(bootstrap, older, "retention.ms") == WEEK_MS
    kafka.ensure_topics(bootstrap, [older, fresh])
    assert kafka.topic_config(bootstrap, older, "retention.ms") == "-1"
    assert kafka.topic_config(bootstrap, older, "segment.bytes") == TEN_MB  # left as it was

    kafka.ensure_topics(bootstrap, [older], retention_ms=30 * 86_400_000)  # CENTRALINO_EVENT_RETENTION_MS
    assert kafka.topic_config(bootstrap, older, "retention.ms") == str(30 * 86_400_000)
