"""The router's live picture of every agent, folded from the agents topic.

A Kafka consumer without a group reads the agents topic and folds each agent's
events with the same pure function the agents projection uses
(`state_view.evolve`), so routing reads memory, not a database.  The picture may
trail the agents service by a few milliseconds; that is safe because the agents
service itself refuses a reservation beyond an agent's capacity.

It reads from where a snapshot of it left off (`snapshot`/`restore`: the router's
checkpoint keeps one), else from the topic's beginning; after losing Kafka it goes
on from its own positions.  A record read twice changes nothing (by sequence).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from zoneinfo import ZoneInfo

from centralino.v1.envelope_pb2 import EventEnvelope

from services.agents import state_view
from services.agents.events import AGENT
from services.agents.events import REGISTRY as AGENT_EVENTS
from services.kernel.envelope import UnknownEventType, read_envelope
from services.kernel.kafka import Consumed, TopicReader

log = logging.getLogger(__name__)
# Routing reads an agent's live state and today's counters (occupancy), never older
# days: the views keep today and yesterday, not the read model's quarter.  Each event
# copies the days a view keeps, and every checkpoint writes every view.
FEED_DAYS_KEPT = 1


@dataclass(frozen=True)
class FeedSnapshot:
    """The feed's picture and where it reads on: every record before `positions` (partition
    -> next offset) is folded into the views (later ones may be too)."""

    views: dict[str, state_view.View]
    leaders: dict[str, str]
    positions: dict[int, int]


class AgentFeed:
    def __init__(self, bootstrap: str, topic: str, tz: ZoneInfo, on_change: Callable[[str], None]) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self.tz = tz
        self._on_change = on_change
        self._views: dict[str, state_view.View] = {}
        self._leaders: dict[str, str] = {}  # team -> team leader, for escalations
        self._positions: dict[int, int] = {}  # partition -> next offset to fold
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def wait_caught_up(self, timeout_s: float) -> bool:
        """True once everything published before the feed started has been folded."""
        return self._caught_up.wait(timeout_s)

    def views(self) -> dict[str, state_view.View]:
        with self._lock:
            return dict(self._views)

    def team_leader(self, team_id: str) -> str:
        return self._leaders.get(team_id, "")

    def snapshot(self) -> FeedSnapshot:
        with self._lock:  # positions move after the views: the views are never behind them
            return FeedSnapshot(dict(self._views), dict(self._leaders), dict(self._positions))

    def restore(self, snapshot: FeedSnapshot) -> None:
        """Begin from `snapshot` instead of the topic's beginning (before `start`)."""
        with self._lock:
            self._views = {
                agent_id: {**state_view.new_view(agent_id), **view} for agent_id, view in snapshot.views.items()
            }
            self._leaders = dict(snapshot.leaders)
            self._positions = dict(snapshot.positions)

    def apply(self, envelope: EventEnvelope) -> None:
        if envelope.event_type == "agents.TeamLeaderAssigned":
            event = AGENT_EVENTS.decode(envelope)
            self._leaders[event.team_id] = event.team_leader_id  # type: ignore[attr-defined]
        if envelope.aggregate_type != AGENT:
            return
        view = self._views.get(envelope.aggregate_id) or state_view.new_view(envelope.aggregate_id)
        if envelope.sequence <= view["version"]:
            return
        event = AGENT_EVENTS.decode(envelope)
        at = envelope.occurred_at.ToDatetime(tzinfo=UTC).timestamp()
        with self._lock:
            self._views[envelope.aggregate_id] = state_view.evolve(
                view, event, at, envelope.sequence, self.tz, days_kept=FEED_DAYS_KEPT
            )
        self._on_change(envelope.aggregate_id)

    def _fold(self, record: Consumed) -> None:
        """Fold one record; skip, with a warning, one no retry could ever read.

        A record that is not an envelope, or an event type this router does not know yet
        (the agents service upgraded first), must not stop routing: retrying it would
        stall the feed for good, and the router never routes on a stale picture.  What
        the router misses this way, reconcile and the agents service's own capacity check
        still catch."""
        place = (record.topic, record.partition, record.offset)
        envelope = read_envelope(record.value, *place)
        try:
            if envelope is not None:
                self.apply(envelope)
        except UnknownEventType as unknown:
            log.warning("agent feed skips record %s-%d@%d: unknown event type %s", *place, unknown)
        with self._lock:
            self._positions[record.partition] = record.offset + 1

    def _reader(self) -> TopicReader:
        reader = TopicReader(self._bootstrap, self._topic, client_id="centralino-routing-agent-feed")
        with self._lock:  # from where the views are, else the whole history: every agent's state
            start = {
                p: min(max(self._positions.get(p, begin), begin), reader.ends.get(p, begin))
                for p, begin in reader.beginnings.items()
            }
        reader.start_at(start)
        return reader

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                reader = self._reader()
                ends = reader.ends
                try:
                    while not self._stopping.is_set():
                        for record in reader.poll(timeout_s=0.1):
                            self._fold(record)
                        if not self._caught_up.is_set() and all(reader.position(p) >= end for p, end in ends.items()):
                            self._caught_up.set()
                finally:
                    reader.close()
            except Exception:  # no broker at start: the views stay, and it goes on from its positions
                log.exception("agent feed lost Kafka; reconnecting")
                self._stopping.wait(2.0)
