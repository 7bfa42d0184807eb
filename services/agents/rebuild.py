"""Rebuild the agents read models from the log: `python -m services.agents.rebuild`.

Run with the projection worker stopped.  Forgets everything the projection
derived (consumer group offsets, the Faust table's changelog, the MongoDB read
models), so the next worker start replays the topic from its beginning.
"""

from __future__ import annotations

import contextlib
import logging
import time

from kafka import KafkaAdminClient
from kafka.errors import GroupIdNotFoundError, UnknownTopicOrPartitionError

from services.agents.adapters import AgentDocument, TeamDocument
from services.kernel import mongo
from services.kernel.config import Settings, load_settings

log = logging.getLogger(__name__)
PROJECTION = "agents-projections"
TABLES = ("agent-state",)


def rebuild(settings: Settings) -> None:
    group = settings.consumer_group(PROJECTION)
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="centralino-rebuild")
    changelogs = [f"{group}-{table}-changelog" for table in TABLES]
    try:
        with contextlib.suppress(GroupIdNotFoundError):
            admin.delete_consumer_groups([group])
        with contextlib.suppress(UnknownTopicOrPartitionError):
            admin.delete_topics(changelogs)
        _wait_until_gone(admin, changelogs)
    finally:
        admin.close()
    AgentDocument.drop_collection()
    TeamDocument.drop_collection()
    log.info("agents read models dropped; the next worker start replays %s", settings.topic("agents"))


def _wait_until_gone(admin: KafkaAdminClient, topics: list[str], timeout_s: float = 60.0) -> None:
    """Topic deletion finishes in the background: a worker started before it is done
    would restore the old table from the old changelog and skip the replay."""
    deadline = time.monotonic() + timeout_s
    while set(topics) & set(admin.list_topics()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Kafka has not deleted {topics} within {timeout_s:.0f}s")
        time.sleep(0.2)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    settings = load_settings()
    mongo.connect(settings)
    rebuild(settings)


if __name__ == "__main__":
    main()
