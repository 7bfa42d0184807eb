"""Fan-out of agent state changes to WatchTeam streams.

One Kafka consumer per server process (no consumer group: every server sees every
change) reads the department topic from its end and hands each AgentStateChanged
to the subscribers of that agent's team.  Per agent, changes come from one
partition, so a subscriber sees them in order.  After losing Kafka it goes on from
where it was, not from the end: the changes made meanwhile still reach the streams
that stayed open (unless the topic's retention dropped them first).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict

from centralino.v1 import agents_pb2 as pb
from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import DecodeError

from services.kernel.envelope import read_envelope
from services.kernel.kafka import Consumed, TopicReader

log = logging.getLogger(__name__)
STATE_CHANGED = "agents.AgentStateChanged"


def to_change(envelope: EventEnvelope) -> pb.AgentStateChange:
    event = pb.AgentStateChanged.FromString(envelope.payload)
    change = pb.AgentStateChange(
        agent_id=event.agent_id,
        team_id=event.team_id,
        transition=event.transition,
        state=event.state,
        reason=event.reason,
        interaction_id=event.interaction_id,
        version=envelope.sequence,
    )
    change.at.CopyFrom(envelope.occurred_at)
    return change


class TeamWatchHub:
    def __init__(self, bootstrap: str, topic: str, max_backlog: int = 10_000) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._max_backlog = max_backlog
        self._subscribers: dict[str, set[queue.Queue[pb.AgentStateChange]]] = defaultdict(set)
        self._next: dict[int, int] = {}  # per partition, the next offset to deliver
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="team-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def subscribe(self, team_id: str) -> queue.Queue[pb.AgentStateChange]:
        subscription: queue.Queue[pb.AgentStateChange] = queue.Queue(maxsize=self._max_backlog)
        with self._lock:
            self._subscribers[team_id].add(subscription)
        return subscription

    def unsubscribe(self, team_id: str, subscription: queue.Queue[pb.AgentStateChange]) -> None:
        with self._lock:
            self._subscribers[team_id].discard(subscription)

    def _publish(self, change: pb.AgentStateChange) -> None:
        with self._lock:
            targets = list(self._subscribers.get(change.team_id, ()))
        for subscription in targets:
            try:
                subscription.put_nowait(change)
            except queue.Full:  # a stalled client must not stall the others
                log.warning("dropping a WatchTeam subscriber of team %s: backlog full", change.team_id)
                self.unsubscribe(change.team_id, subscription)

    def _deliver(self, record: Consumed) -> None:
        # Skipping a record no one can read beats reconnecting past live changes.
        envelope = read_envelope(record.value, record.topic, record.partition, record.offset)
        if envelope is None or envelope.event_type != STATE_CHANGED:
            return
        try:
            self._publish(to_change(envelope))
        except DecodeError:
            log.warning("team watch skips event %s: not an agent state change it can read", envelope.event_id)

    def _reader(self) -> TopicReader:
        reader = TopicReader(self._bootstrap, self._topic, client_id="centralino-agents-team-watch")
        for partition, end in reader.ends.items():  # first live changes only, from the end; then where it was
            self._next.setdefault(partition, end)
        reader.start_at(self._next)
        return reader

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                reader = self._reader()
                self._ready.set()
                try:
                    while not self._stopping.is_set():
                        for record in reader.poll(timeout_s=0.2):
                            self._deliver(record)
                            self._next[record.partition] = record.offset + 1
                finally:
                    reader.close()
            except Exception:  # no broker to start from, or a failure mid-batch: keep the streams open, start again
                log.exception("team watch lost Kafka; reconnecting")
                self._stopping.wait(2.0)
