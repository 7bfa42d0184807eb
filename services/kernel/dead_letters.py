"""Dead letters: records a consumer group had to skip, kept with where they came from and why.

A projection skips a record no retry could ever read (not an envelope, or an event
type from a newer service during a rolling upgrade): retrying would stop it for good.
Skipping must not mean losing, so the record goes, unchanged, to
`<topic>.dead-letters`, keyed as before, with headers naming its topic, partition,
offset, the consumer group and the reason.  An operator can read them there and, once
a release can read them, replay them into the topic.  The source topic's retention no
longer decides whether they can be found.

Only consumer groups park records: the router's agent feed and `WatchTeam` read every
record in every process and only log what they skip (one copy per group, not per
replica).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from services.kernel.kafka import EventProducer, ensure_topics, make_producer

log = logging.getLogger(__name__)

SUFFIX = ".dead-letters"
HEADER_PREFIX = "centralino.dead_letter."
ATTEMPTS = 5


def dead_letter_topic(topic: str) -> str:
    return topic + SUFFIX


class DeadLetters:
    """Parks skipped records of one consumer group; the producer is made on first use."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self._bootstrap = bootstrap
        self._group = group
        self._producer: EventProducer | None = None
        self._topics: set[str] = set()

    def park(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        reason: str,
    ) -> bool:
        """Send the record to its dead-letter topic (blocking, a few retries); False, with
        an error logged, if it could not: it is then only in its source topic."""
        target = dead_letter_topic(topic)
        where = {"topic": topic, "partition": str(partition), "offset": str(offset), "group": self._group}
        added = [(HEADER_PREFIX + name, text.encode()) for name, text in {**where, "reason": reason}.items()]
        record = (target, key or b"", value or b"", [*headers, *added])
        delay = 0.5
        for attempt in range(ATTEMPTS):
            try:
                if target not in self._topics:
                    ensure_topics(self._bootstrap, [target])
                    self._topics.add(target)
                if self._producer is None:
                    self._producer = make_producer(self._bootstrap, client_id=f"{self._group}-dead-letters")
                self._producer.send_all([record], timeout_s=10)
                log.warning("parked record %s-%d@%d in %s: %s", topic, partition, offset, target, reason)
                return True
            except Exception:
                if attempt == ATTEMPTS - 1:
                    log.exception(
                        "could not park record %s-%d@%d (%s); it stays in its topic only",
                        topic,
                        partition,
                        offset,
                        reason,
                    )
                    return False
                time.sleep(delay)
                delay *= 2
        return False  # not reached: the last attempt returns
