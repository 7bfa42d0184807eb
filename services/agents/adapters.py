"""Agents read models in MongoDB (mongoengine) and the idempotent writes that maintain them."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import mongoengine as me
from mongoengine.queryset import transform
from pymongo import UpdateOne

from services.agents.domain.agent import Agent, WorkItem
from services.agents.state_view import View, new_view
from services.kernel.snapshots import Snapshot, SnapshotStore

log = logging.getLogger(__name__)
PACKED = ("days", "shifts")  # stored as JSON text: see AgentDocument


class AgentDocument(me.Document):
    """One agent: profile, live state, today's counters and adherence (see state_view)."""

    agent_id = me.StringField(primary_key=True)
    name = me.StringField()
    team_id = me.StringField()
    seniority = me.IntField()
    skills = me.ListField(me.DictField())
    channels = me.ListField(me.DictField())
    logged_in = me.BooleanField(default=False)
    ready = me.BooleanField(default=False)
    state = me.IntField()
    reason = me.IntField(default=0)
    since = me.FloatField()
    accounted_until = me.FloatField()
    work = me.ListField(me.DictField())
    available_on = me.ListField(me.IntField())
    # The per-day counters and the shifts, each as one JSON text: FerretDB v1 on SQLite
    # reads and rewrites the whole document on every update, at a cost that grows with
    # its number of values, and these two grow with every day kept.  After 92 days of
    # work: 9.0 ms of FerretDB CPU per update as nested documents, 1.2 ms as text
    # (bench/agent_history.py).  Nothing queries inside them; documents written before
    # hold nested documents, read all the same.
    days = me.StringField()
    shifts = me.StringField()
    # Bookkeeping written in the same update as the change it records, so a
    # redelivered or replayed event is recognised and changes nothing.
    version = me.IntField(default=0)  # sequence of the last applied event
    last_event_id = me.StringField()
    events_applied = me.IntField(default=0)
    trace_id = me.StringField()  # trace of the request behind the last change, for SRE
    projected_at = me.DateTimeField()
    registered_at = me.DateTimeField()

    meta = {
        "collection": "agents_view",
        "auto_create_index": False,
        "indexes": ["team_id", "state", "available_on"],
    }

    def to_view(self) -> View:
        fields = self.to_mongo().to_dict()
        fields["agent_id"] = fields.pop("_id")
        for name in PACKED:
            if isinstance(fields.get(name), str):
                fields[name] = json.loads(fields[name])
        return {**new_view(fields["agent_id"]), **fields}  # unset (None) fields are not stored


class TeamDocument(me.Document):
    team_id = me.StringField(primary_key=True)
    name = me.StringField()
    supervisor_id = me.StringField()
    team_leader_id = me.StringField()
    members = me.ListField(me.StringField())
    version = me.IntField(default=0)
    last_event_id = me.StringField()

    meta = {"collection": "teams_view", "auto_create_index": False}


def ensure_indexes() -> None:
    AgentDocument.ensure_indexes()
    TeamDocument.ensure_indexes()


def _apply_once(document: type[me.Document], key: str, sequence: int, fields: dict[str, Any], **more: Any) -> bool:
    """Write `fields` (and any `more` update operators) only if the document has not yet
    seen `sequence`; True if written."""
    update: dict[str, Any] = {f"set__{name}": value for name, value in fields.items()} | more
    try:
        result = document.objects(pk=key, version__lt=sequence).update_one(upsert=True, **update)
    except me.NotUniqueError:
        return False  # the document exists with version >= sequence: already applied
    return bool(result)


def save_agent_view(view: View, event_id: str, trace_id: str, registered_at: datetime | None = None) -> bool:
    """Write the view after one event (its version); False if the document had seen it."""
    return save_agent_views(ViewWrite(view, [view["version"]], event_id, trace_id, registered_at)) > 0


@dataclass(frozen=True)
class ViewWrite:
    """One agent's write: the view folded from the events `sequences` (ascending, the last
    one the view's version; `event_id` and `trace_id` are the last one's)."""

    view: View
    sequences: Sequence[int]
    event_id: str
    trace_id: str
    registered_at: datetime | None = None

    @property
    def key(self) -> str:
        return str(self.view["agent_id"])

    def fields(self) -> dict[str, Any]:
        # events_applied is incremented by the same update; setting it too would conflict.
        fields = {k: v for k, v in self.view.items() if k not in ("agent_id", "events_applied")}
        for name in PACKED:
            fields[name] = json.dumps(fields[name], sort_keys=True, separators=(",", ":"))
        fields.update(last_event_id=self.event_id, trace_id=self.trace_id, projected_at=datetime.now(UTC))
        if self.registered_at:
            fields["registered_at"] = self.registered_at
        return fields


def save_agent_views(write: ViewWrite) -> int:
    """Write the view folded from the events `write.sequences` in one update, unless the
    document has seen them all.  `events_applied` grows by how many of them the document
    had not seen, so a replay cut into other batches (a crash between this write and the
    Faust table's update) counts every event once.  Returns that number (0: already applied).
    """
    fields, key, first, last = write.fields(), write.key, write.sequences[0], write.sequences[-1]
    if _apply_once(AgentDocument, key, first, fields, inc__events_applied=len(write.sequences)):
        return len(write.sequences)  # the usual case: the document had seen none of them
    while True:  # it has seen some: a replay overlapping what an earlier batch wrote
        document = AgentDocument.objects(pk=key).only("version").first()
        if document is None:  # gone meanwhile (a rebuild): start it again
            if _apply_once(AgentDocument, key, first, fields, inc__events_applied=len(write.sequences)):
                return len(write.sequences)
            continue
        seen = document.version
        if seen >= last:
            return 0
        new = sum(1 for sequence in write.sequences if sequence > seen)
        update = {f"set__{name}": value for name, value in fields.items()}
        if AgentDocument.objects(pk=key, version=seen).update_one(inc__events_applied=new, **update):
            return new


def save_existing_agent_views(writes: Sequence[ViewWrite]) -> None:
    """Write the views of agents whose documents exist, all in one command (one round trip
    instead of one per agent: the projection's main cost), each update conditional as in
    `save_agent_views`.  If any document had seen part of its events already (a replay
    after a crash between the write and the Faust table's update), every write of the
    batch is done again one by one, which skips those just written.

    No upserts here: FerretDB v1 stops a batch of updates at the first duplicate-key
    error whatever `ordered` says, and reports it at the wrong index.
    """
    if not writes:
        return
    updates = [
        UpdateOne(
            transform.query(AgentDocument, pk=write.key, version__lt=write.sequences[0]),
            transform.update(
                AgentDocument,
                inc__events_applied=len(write.sequences),
                **{f"set__{name}": value for name, value in write.fields().items()},
            ),
        )
        for write in writes
    ]
    result = AgentDocument._get_collection().bulk_write(updates, ordered=True)
    if result.matched_count < len(writes):
        for write in writes:
            save_agent_views(write)


def save_team_view(team_id: str, sequence: int, event_id: str, **fields: Any) -> bool:
    return _apply_once(TeamDocument, team_id, sequence, {**fields, "version": sequence, "last_event_id": event_id})


BOOKKEEPING = ("last_event_id", "events_applied", "trace_id", "projected_at", "registered_at")


def load_agent_view(agent_id: str) -> View | None:
    """The folded view alone, without the projection's bookkeeping fields."""
    document = AgentDocument.objects(agent_id=agent_id).first()
    if document is None:
        return None
    view = document.to_view()
    for name in BOOKKEEPING:
        view.pop(name, None)
    return view


# ---- snapshots of the Agent aggregate (services.kernel.snapshots) ----

AGENT_SNAPSHOTS = "agents.Agent"
# Bump when the Agent's fields or the way events fold into it change: snapshots of
# another format are ignored, and agents are folded from their events once more.
AGENT_SNAPSHOT_FORMAT = 1


def agent_snapshot(agent: Agent) -> Snapshot:
    state = {
        "registered": agent.registered,
        "name": agent.name,
        "team_id": agent.team_id,
        # Lists of documents, not of lists: FerretDB v1 stores no nested arrays.
        "channels": [{"channel": channel, "max_concurrent": most} for channel, most in agent.channels],
        "logged_in": agent.logged_in,
        "ready": agent.ready,
        "reason": agent.reason,
        "work": [{"interaction_id": w.interaction_id, "channel": w.channel, "phase": w.phase} for w in agent.work],
        # ISO text, not a BSON date: those keep milliseconds, and changes are ordered by microseconds.
        "last_change_at": agent.last_change_at.isoformat() if agent.last_change_at else None,
        "shifts": sorted(agent.shifts),
    }
    return Snapshot(agent.version, state)


def agent_from_snapshot(agent_id: str, snapshot: Snapshot) -> Agent:
    state = snapshot.state
    return Agent(
        agent_id=agent_id,
        version=snapshot.version,
        registered=state["registered"],
        name=state["name"],
        team_id=state["team_id"],
        channels=tuple((int(c["channel"]), int(c["max_concurrent"])) for c in state["channels"]),
        logged_in=state["logged_in"],
        ready=state["ready"],
        reason=state["reason"],
        work=tuple(WorkItem(w["interaction_id"], int(w["channel"]), w["phase"]) for w in state["work"]),
        last_change_at=datetime.fromisoformat(state["last_change_at"]) if state["last_change_at"] else None,
        shifts=frozenset(state["shifts"]),
    )


class AgentSnapshots:
    """The Agent aggregate's snapshots: its codec over the kernel's snapshot store."""

    def __init__(self, store: SnapshotStore | None = None) -> None:
        self.store = store or SnapshotStore(AGENT_SNAPSHOTS, AGENT_SNAPSHOT_FORMAT)

    def load(self, agent_id: str) -> Agent | None:
        snapshot = self.store.load(agent_id)
        if snapshot is None:
            return None
        try:
            return agent_from_snapshot(agent_id, snapshot)
        except (KeyError, TypeError, ValueError):  # unreadable: the events decide
            log.warning("ignoring the unreadable snapshot of agent %s", agent_id, exc_info=True)
            return None

    def save_later(self, agent: Agent) -> None:
        self.store.save_later(agent.agent_id, agent_snapshot(agent))
