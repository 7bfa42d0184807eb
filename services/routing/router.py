"""The router: keeps the open interactions, matches them to agents, drives offers.

All decisions on interactions are taken under one lock in one process (one
active router per deployment), on the state in memory, which runs ahead of the
store: a decision is applied at once and its events go to the next group commit.
Nothing waits for the database or the agents service while holding the lock; a
caller waits for its own write after releasing it, and what follows a write
(moving the agent, announcing an offer) happens only once it is durable.  A write
that fails takes every later write of the same interaction with it (the store
leaves no gap), and the router reloads that interaction from the store.

Correctness does not rest on the lock alone: an interaction can only be offered
while QUEUED (optimistic concurrency on the aggregate), and an agent can only be
reserved within its capacity (the agents service's own aggregate).  After a
crash the router folds the routing log from the event store and carries on:
offers still standing keep their deadlines, nothing accepted is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from centralino.v1 import routing_pb2 as pb
from centralino.v1.agents_pb2 import AgentState, Transition
from centralino.v1.envelope_pb2 import EventEnvelope
from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import propagate

from services.agents import state_view
from services.agents.domain.agent import Agent, WorkItem
from services.agents.domain.state_machine import available_channels
from services.kernel.envelope import Metadata, new_id
from services.kernel.errors import ConcurrencyConflict, InvalidField, NotFound, PreconditionFailed
from services.kernel.eventstore import StoredEvent
from services.kernel.repository import Repository
from services.kernel.telemetry import current_trace_headers
from services.routing.agent_feed import AgentFeed
from services.routing.agents_port import AgentRefused, AgentsPort, Outcome
from services.routing.checkpoints import (
    Checkpoint,
    load_checkpoint,
    load_feed_checkpoint,
    save_checkpoint,
    save_feed_checkpoint,
)
from services.routing.domain import interaction as domain
from services.routing.domain.interaction import OPEN, Interaction, S
from services.routing.domain.matching import Candidate, plan
from services.routing.domain.queues import QueueConfig, queue_for
from services.routing.domain.stats import DayTallies, QueueKpis, is_waiting, kpis
from services.routing.events import REGISTRY
from services.routing.offers import OfferBus

log = logging.getLogger(__name__)
PRODUCER = "centralino-routing"
REFUSAL_COOLDOWN_S = 1.0
MOVING_GRACE_S = 2.0
RECONCILE_EVERY_S = 2.0  # after a refused reservation, let the agent feed catch up first
WRITE_TIMEOUT_S = 30.0
CLOSED = frozenset({S.COMPLETED, S.ABANDONED, S.CANCELLED})
Clock = Callable[[], datetime]


class Router:
    def __init__(
        self,
        interactions: Repository,
        agents: AgentsPort,
        feed: AgentFeed,
        bus: OfferBus,
        queues: Mapping[str, QueueConfig],
        clock: Clock,
        sl_variant: str,
        topic: str,
        tz: ZoneInfo,
        closed_retention_s: float,
        checkpoint_s: float = 10.0,
    ) -> None:
        self._repo = interactions
        self._agents = agents
        self._feed = feed
        self._bus = bus
        self._queues = dict(queues)
        self._needs_occupancy = any(q.strategy == "least_occupied" for q in self._queues.values())
        self._clock = clock
        self.sl_variant = sl_variant
        self._topic = topic
        self._lock = threading.RLock()
        self._all: dict[str, Interaction] = {}  # the open ones and those closed within the retention
        self._tallies = DayTallies(self._queues, tz)  # the queues' figures: closed interactions need not stay
        self._tz = tz
        self._retention_s = closed_retention_s
        self._closing: deque[tuple[float, str]] = deque()  # (closed at, id), oldest first: forgotten in turn
        self._open: dict[str, Interaction] = {}  # the ones still in play: routing passes look at these only
        # Guarded by _writes, a lock taken inside _lock (never around it), so that a write's
        # outcome is recorded without waiting for the router: the interactions with writes
        # not yet answered, and those whose write failed (reloaded from the store).
        self._writes = threading.Lock()
        self._writing: Counter[str] = Counter()
        self._stale: set[str] = set()
        self._phantoms: set[str] = set()  # created in memory, the creation not yet stored
        self._checkpoint_s = checkpoint_s
        self._unconfirmed: set[str] = set()  # offered, the agent's reservation not yet confirmed
        self._announced: set[str] = set()  # offered, reserved and put on the agent's stream by this process
        self._journey: dict[str, tuple[str, dict[str, str]]] = {}  # correlation id, W3C headers
        self._pending: dict[str, dict[str, int]] = defaultdict(dict)  # agent -> reserved, not yet in the feed
        self._cooldown: dict[str, float] = {}
        self._moving: dict[str, float] = {}  # agent -> when the router decided their END
        self._last_offer_at: dict[str, float] = {}
        self._as_agent: dict[str, tuple[int, Agent, dict[str, int]]] = {}  # agent -> (version, agent, skills)
        self._next_reconcile = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)
        # Checkpoints are written on a thread of their own: their database writes (every
        # agent's view among them) never hold up a routing pass.
        self._checkpointer = threading.Thread(target=self._checkpoint_every, name="router-checkpoint", daemon=True)

    # ---- life cycle ----

    def recover(self) -> int:
        """Rebuild from the last checkpoint and the routing log after it, or from the whole
        log if there is none; returns how many interactions are open."""
        started = time.monotonic()
        checkpoint = load_checkpoint(self._topic)
        feed = load_feed_checkpoint(self._topic)
        if feed is not None:  # the agents topic is read on from there, not from its beginning
            self._feed.restore(feed)
        with self._lock:
            if checkpoint is None:
                self._fold_whole_log()
                source = "the whole routing log"
            else:
                commits, read_back = self._recover_from(checkpoint)
                source = f"the checkpoint at commit {checkpoint.commit}, {commits} commits after it"
                source += f" and {read_back} interactions read back"
            # _put queued each one as it closed, in log order (by interaction): by close time instead.
            self._closing = deque(sorted(self._closing))
            self.forget_closed()
            log.info(
                "recovered %d open interactions from %s in %.2f s", len(self._open), source, time.monotonic() - started
            )
            return len(self._open)

    def _fold_whole_log(self) -> None:
        for stored in StoredEvent.objects(topic=self._topic).order_by("aggregate_id", "sequence"):
            envelope = EventEnvelope.FromString(stored.envelope)
            iid = envelope.aggregate_id
            at = envelope.occurred_at.ToDatetime(tzinfo=UTC).timestamp()
            current = self._all.get(iid) or Interaction(interaction_id=iid)
            self._put(domain.apply(current, REGISTRY.decode(envelope), at))
            self._journey.setdefault(iid, (envelope.correlation_id, dict(stored.trace_headers or {})))

    def _recover_from(self, checkpoint: Checkpoint) -> tuple[int, int]:
        """The checkpoint's tallies, plus every interaction it says to read back, plus every
        one with an event accepted in a commit after it; the closed ones it counted stay out
        of memory, like forgotten ones."""
        self._tallies.restore(checkpoint.tallies)
        wanted: dict[str, set[str] | None] = dict.fromkeys(checkpoint.read_back)  # None: whatever it holds
        store = self._repo.store
        commits = 0
        for _, envelopes in store.commits_from(checkpoint.commit):
            commits += 1
            for envelope in envelopes:
                later = wanted.setdefault(envelope.aggregate_id, set())
                if later is not None:
                    later.add(envelope.event_id)
        for iid, later in wanted.items():
            stored = store.load_stored(iid)
            if later is not None and not any(envelope.event_id in later for envelope, _ in stored):
                continue  # all before the checkpoint (what the log holds after it was refused)
            history = [(REGISTRY.decode(e), e.occurred_at.ToDatetime(tzinfo=UTC)) for e, _ in stored]
            interaction = domain.replay(iid, history)
            if interaction.exists:
                self._put(interaction)
                first, headers = stored[0]
                self._journey[iid] = (first.correlation_id, headers)
        return commits, len(wanted)

    def checkpoint(self) -> bool:
        """Save where a restart begins: the tallies without the interactions a restart reads
        back (the open ones, and any with a write not yet answered or failed), and the first
        commit a write answered from now on can be in.  False if there is none yet.  The agent
        feed's snapshot is saved beside it in any case, and its failure (one document of every
        agent's view: MongoDB's 16 MB cap, about 21,000 agents) does not hold the router's back."""
        try:
            save_feed_checkpoint(self._topic, self._feed.snapshot())
        except Exception:
            log.exception("could not save the agent feed's checkpoint; a restart reads the agents topic from the last")
        with self._lock, self._writes:
            answered = self._repo.store.answered_through()
            if answered is None:
                return False  # nothing written by this process: the last checkpoint still holds
            unsettled = self._open.keys() | self._writing.keys() | self._stale
            read_back = sorted(iid for iid in unsettled if iid in self._all)
            tallies = self._tallies.copy()
            now = self._clock().timestamp()
            for iid in read_back:
                tallies.count(self._all[iid], None, now)
        save_checkpoint(self._topic, Checkpoint(answered + 1, read_back, tallies.rows()))
        return True

    def _checkpoint_every(self) -> None:
        while not self._stopping.wait(self._checkpoint_s):
            try:
                self.checkpoint()
            except Exception:
                log.exception("could not save a checkpoint; trying again in %.0f s", self._checkpoint_s)

    def start(self) -> None:
        self._thread.start()
        self._checkpointer.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._checkpointer.join(timeout=10)
        self._agents.stop()
        try:
            self.checkpoint()  # a restart then reads next to nothing of the log
        except Exception:
            log.exception("could not save a checkpoint on stopping")

    def wake(self, *_: object) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=0.2)  # also the offer-timeout tick
            self._wake.clear()
            if not self._feed.wait_caught_up(0):
                continue  # never route on a stale picture of the agents
            try:
                self._reload_stale()
                self.expire_offers()
                if time.monotonic() >= self._next_reconcile:
                    self._next_reconcile = time.monotonic() + RECONCILE_EVERY_S
                    self.reconcile()
                self.route_once()
                self.forget_closed()
            except Exception:
                log.exception("routing pass failed; retrying")

    # ---- writing ----

    def _meta(self, iid: str) -> Metadata:
        correlation, _ = self._journey.get(iid, ("", {}))
        return Metadata(correlation_id=correlation or iid, causation_id=new_id(), producer=PRODUCER)

    def _save(
        self,
        interaction: Interaction,
        events: Sequence[Message],
        meta: Metadata | None = None,
        then: Callable[[], None] | None = None,
    ) -> tuple[Interaction, Future[None]]:
        """Apply the events in memory now and queue them for the next group commit;
        `then` runs once they are durable (in commit order, so agent steps keep it)."""
        iid = interaction.interaction_id
        now = self._clock()
        _, headers = self._journey.get(iid, ("", {}))
        # Router-made changes continue the journey's trace begun by CreateInteraction.
        token = otel_context.attach(propagate.extract(headers)) if headers and meta is None else None
        try:
            _, written = self._repo.submit(iid, interaction.version, events, meta or self._meta(iid), occurred_at=now)
        finally:
            if token is not None:
                otel_context.detach(token)
        for event in events:
            interaction = domain.apply(interaction, event, now.timestamp())
        self._put(interaction)
        with self._writes:
            self._writing[iid] += 1
        written.add_done_callback(lambda done: self._written(iid, done, then))
        return interaction, written

    def _written(self, iid: str, done: Future[None], then: Callable[[], None] | None) -> None:
        failed = done.exception() is not None
        with self._writes:
            self._writing[iid] -= 1
            if self._writing[iid] <= 0:
                del self._writing[iid]
            if failed:
                self._stale.add(iid)
        if failed:
            log.warning("write of interaction %s failed (%s); reloading it", iid, done.exception())
            self._wake.set()
        elif then is not None:
            then()

    @staticmethod
    def _wait(written: Future[None]) -> None:
        """The caller's answer waits for durability: an accepted command is never lost."""
        written.result(timeout=WRITE_TIMEOUT_S)

    def _put(self, interaction: Interaction) -> None:
        iid = interaction.interaction_id
        before = self._all.get(iid)
        self._tallies.count(before, interaction, self._clock().timestamp())
        if interaction.status in CLOSED and (before is None or before.status not in CLOSED):
            self._closing.append((interaction.closed_at or 0.0, iid))
        self._all[iid] = interaction
        if interaction.status in OPEN:
            self._open[interaction.interaction_id] = interaction
        else:
            self._open.pop(interaction.interaction_id, None)
        if interaction.status != S.OFFERED:
            self._announced.discard(interaction.interaction_id)

    def _reload_stale(self) -> None:
        with self._lock:
            with self._writes:
                stale, self._stale = self._stale, set()
            for iid in stale:
                self._reload(iid)

    def _reload(self, iid: str) -> Interaction:
        interaction = domain.replay(iid, self._repo.history(iid))
        if iid in self._phantoms:  # its creation failed: take back what memory counted of it
            self._phantoms.discard(iid)
            self._drop(iid)
        if not interaction.exists or self._past_retention(interaction) or self._counted_elsewhere(interaction):
            # Never written, or a late retry of its creation lost to the stored one, which is
            # closed and was counted when it closed.  What memory holds is the failure's.
            self._drop(iid)
            self._unconfirmed.discard(iid)
            return interaction
        self._put(interaction)
        if interaction.status != S.OFFERED:
            self._unconfirmed.discard(iid)
        return interaction

    def _counted_elsewhere(self, interaction: Interaction) -> bool:
        """Closed and not in memory: forgotten, or left out by the checkpoint a restart began
        from; either way counted already."""
        return interaction.status in CLOSED and interaction.interaction_id not in self._all

    def _get(self, iid: str) -> Interaction:
        interaction = self._all.get(iid)
        if interaction is None:  # closed and forgotten (or unknown): its history answers
            interaction = domain.replay(iid, self._repo.history(iid))
        if not interaction.exists:
            raise NotFound(f"interaction {iid} does not exist")
        return interaction

    # ---- forgetting closed interactions: memory holds the open ones and a recent past ----

    def _past_retention(self, interaction: Interaction) -> bool:
        closed_at = interaction.closed_at
        return interaction.status in CLOSED and closed_at is not None and self._forget_at(closed_at)

    def _forget_at(self, closed_at: float) -> bool:
        return closed_at + self._retention_s <= self._clock().timestamp()

    def forget_closed(self) -> int:
        """Let go of the interactions closed longer than the retention ago: their figures
        stay in the tallies, and a late request about one reads its history from the store."""
        forgotten = 0
        with self._lock:
            while self._closing and self._forget_at(self._closing[0][0]):
                _, iid = self._closing.popleft()
                interaction = self._all.get(iid)
                if interaction is not None and interaction.status in CLOSED:
                    del self._all[iid]
                    self._journey.pop(iid, None)
                    forgotten += 1
        return forgotten

    def _drop(self, iid: str) -> None:
        """Forget an interaction whose state in memory was never stored: take its figures back."""
        before = self._all.pop(iid, None)
        self._open.pop(iid, None)
        self._journey.pop(iid, None)
        self._announced.discard(iid)
        if before is not None:
            self._tallies.count(before, None, self._clock().timestamp())

    # ---- intake ----

    def create(self, command: domain.CreateInteraction, correlation_id: str) -> Interaction:
        queue = queue_for(self._queues.values(), command.department, command.language, command.direction)
        iid = command.interaction_id
        with self._lock:
            known = self._all.get(iid)
            current = known or Interaction(interaction_id=iid)
            events = domain.create(command, current, queue)
            if events:
                self._journey[iid] = (correlation_id or iid, current_trace_headers())
                meta = Metadata(correlation_id=correlation_id or iid, causation_id=new_id(), producer=PRODUCER)
                if known is None:  # it may exist all the same, closed and out of memory: see _reload
                    self._phantoms.add(iid)
                current, written = self._save(current, events, meta, then=lambda: self._phantoms.discard(iid))
        self._wake.set()
        if events:
            try:
                self._wait(written)
            except ConcurrencyConflict:  # a retry that came after the interaction was forgotten
                with self._lock:
                    stored = self._reload(command.interaction_id)
                if not stored.exists:
                    raise
                return stored
        return current

    def abandon(self, iid: str, reason: str, meta: Metadata) -> Interaction:
        return self._withdraw(iid, lambda i: domain.abandon(i, reason), meta)

    def cancel(self, iid: str, reason: str, meta: Metadata) -> Interaction:
        return self._withdraw(iid, lambda i: domain.cancel(i, reason), meta)

    def _withdraw(self, iid: str, decide: Callable[[Interaction], list[Message]], meta: Metadata) -> Interaction:
        with self._lock:
            before = self._get(iid)

            def then() -> None:
                if before.status == S.OFFERED:  # release the reserved agent, no fault of theirs
                    self._move_agent(before.agent_id, iid, Transition.REJECT_OFFER)
                if before.warm_from:  # the consulting agent's customer has gone
                    self._move_agent(before.warm_from, iid, Transition.END)

            after, written = self._save(before, decide(before), meta, then)
            if before.status == S.OFFERED:
                self._pending[before.agent_id].pop(iid, None)
        self._wait(written)
        return after

    # ---- agent side ----

    def accept(self, agent_id: str, iid: str, meta: Metadata) -> Interaction:
        with self._lock:
            warm_from = self._get(iid).warm_from
        # A warm transfer: the consulting agent hands over now and wraps up.
        handover = (warm_from, Transition.END) if warm_from else None
        return self._agent_step(agent_id, iid, domain.accept, Transition.CONNECT, meta, also=handover)

    def transfer(
        self, agent_id: str, iid: str, to_queue: str, to_agent: str, warm: bool, meta: Metadata
    ) -> Interaction:
        if bool(to_queue) == bool(to_agent):
            raise InvalidField("to_queue_id", "give either a queue or an agent to transfer to")
        with self._lock:
            interaction = self._get(iid)
            queue = self._queues.get(to_queue or interaction.queue_id)
            if queue is None:
                raise InvalidField("to_queue_id", f"no queue {to_queue!r}")
            if to_agent and to_agent not in self._feed.views():
                raise InvalidField("to_agent_id", f"no agent {to_agent!r}")
            moved, written = self._hand_over(agent_id, interaction, queue, to_agent, warm, meta)
        self._wait(written)
        return moved

    def escalate(self, agent_id: str, iid: str, to_team_leader: bool, reason: str, meta: Metadata) -> Interaction:
        with self._lock:
            interaction = self._get(iid)
            if to_team_leader:
                team = self._feed.views().get(agent_id, {}).get("team_id", "")
                leader = self._feed.team_leader(team)
                if not leader:
                    raise PreconditionFailed(f"team {team or '?'} of agent {agent_id} has no team leader")
                queue = self._queues[interaction.queue_id]
                moved, written = self._hand_over(
                    agent_id, interaction, queue, leader, False, meta, escalated=True, reason=reason
                )
            else:
                queue = queue_for(self._queues.values(), "escalation", interaction.language, pb.INBOUND)
                moved, written = self._hand_over(
                    agent_id, interaction, queue, "", False, meta, escalated=True, reason=reason
                )
        self._wait(written)
        return moved

    def _hand_over(
        self,
        agent_id: str,
        interaction: Interaction,
        queue: QueueConfig,
        to_agent: str,
        warm: bool,
        meta: Metadata,
        escalated: bool = False,
        reason: str = "",
    ) -> tuple[Interaction, Future[None]]:
        events = domain.transfer(interaction, agent_id, queue, to_agent, warm, escalated, reason)
        iid = interaction.interaction_id

        def then() -> None:
            if not warm:  # cold: the agent wraps up now; warm: they stay on until the next one accepts
                self._move_agent(agent_id, iid, Transition.END)

        moved = self._save(interaction, events, meta, then)
        self._wake.set()
        return moved

    def reject(self, agent_id: str, iid: str, meta: Metadata) -> Interaction:
        result = self._agent_step(
            agent_id, iid, lambda i, a: domain.end_offer(i, a, "rejected"), Transition.REJECT_OFFER, meta
        )
        self._wake.set()
        return result

    def end(self, agent_id: str, iid: str, meta: Metadata) -> Interaction:
        return self._agent_step(agent_id, iid, domain.end, Transition.END, meta)

    def complete(self, agent_id: str, iid: str, code: str, disposition: str, meta: Metadata) -> Interaction:
        with self._lock:
            interaction = self._get(iid)
            transferred_away = interaction.agent_id != agent_id and interaction.status not in (S.WRAP_UP, S.COMPLETED)
            if transferred_away:
                domain.complete(replace(interaction, status=S.WRAP_UP, agent_id=agent_id), agent_id, code, disposition)
        if transferred_away:  # the agent finishes their own after-call work; the interaction has moved on
            try:
                self._agents.change(agent_id, Transition.COMPLETE_WRAP_UP, iid, wrap_up_code=code)
            except AgentRefused as refused:
                raise PreconditionFailed(str(refused)) from refused
            return interaction
        decide = lambda i, a: domain.complete(i, a, code, disposition)  # noqa: E731
        result = self._agent_step(agent_id, iid, decide, Transition.COMPLETE_WRAP_UP, meta, code)
        self._wake.set()
        return result

    def _agent_step(
        self,
        agent_id: str,
        iid: str,
        decide: Callable[[Interaction, str], list[Message]],
        transition: int,
        meta: Metadata,
        wrap_up_code: str = "",
        also: tuple[str, int] | None = None,
    ) -> Interaction:
        """Record the step on the interaction (the source of truth); once durable, move the
        agent (and `also` another one).  If the agents service cannot follow, `reconcile`
        brings the agent in line."""
        with self._lock:
            before = self._get(iid)

            def then() -> None:
                self._move_agent(agent_id, iid, transition, wrap_up_code)
                if also is not None:
                    self._move_agent(also[0], iid, also[1])

            events = decide(before, agent_id)
            if not events:  # a repeat of a step already taken: the agent moved (or reconcile moves it)
                return before
            interaction, written = self._save(before, events, meta, then)
            self._pending[agent_id].pop(iid, None)
        self._wait(written)
        return interaction

    def _move_agent(self, agent_id: str, iid: str, transition: int, wrap_up_code: str = "") -> None:
        """Queue the agent's step (in order after every step queued before); refusals are logged."""
        if transition == Transition.END:
            self._moving[agent_id] = self._clock().timestamp()

        def check(outcome: Outcome) -> None:
            if outcome.exception() is not None:
                name = Transition.Name(transition)  # type: ignore[arg-type]
                log.warning("agent %s did not follow %s on %s: %s", agent_id, name, iid, outcome.exception())

        self._agents.send(agent_id, transition, iid, wrap_up_code=wrap_up_code).add_done_callback(check)

    # ---- recovery: bring agents in line with the interactions ----

    def reconcile(self, grace_s: float = 3.0) -> int:
        """Drive each agent's work item to the phase its interaction is in.

        Interactions change first and agents follow, so after a crash (or an agents
        service outage) between the two, an agent can be a step behind; changes
        younger than `grace_s` are left alone while the agent feed catches up."""
        fixes = 0
        with self._lock:
            now = self._clock().timestamp()
            views = self._feed.views()
            for agent_id, view in views.items():
                for item in view["work"]:
                    interaction = self._all.get(item["interaction_id"])
                    if interaction is None or now - (interaction.changed_at or now) < grace_s:
                        continue
                    if now - item["since"] < grace_s:
                        continue
                    fixes += self._drive(agent_id, item["phase"], interaction)
            for interaction in list(self._open.values()):
                phase = domain.AGENT_PHASE.get(interaction.status)
                if phase is None or now - (interaction.changed_at or now) < grace_s:
                    continue
                agent_view = views.get(interaction.agent_id)
                held = {w["interaction_id"] for w in agent_view["work"]} if agent_view else set()
                unconfirmed = interaction.interaction_id in self._unconfirmed
                if interaction.interaction_id not in held and interaction.status == S.OFFERED and not unconfirmed:
                    fixes += self._reserve_again(interaction)
        return fixes

    def _drive(self, agent_id: str, phase: str, interaction: Interaction) -> int:
        iid = interaction.interaction_id
        if interaction.warm_from == agent_id:
            return 0  # consulting during a warm transfer: connected on purpose
        target = domain.AGENT_PHASE.get(interaction.status) if interaction.agent_id == agent_id else None
        if interaction.status == S.COMPLETED and interaction.agent_id == agent_id:
            target = "done"
        order = ["reserved", "connected", "wrap_up", "done"]
        current = "connected" if phase == "held" else phase
        if target is None:  # not this agent's any more (withdrawn, transferred, re-offered, ...)
            if current == "reserved":
                self._move_agent(agent_id, iid, Transition.REJECT_OFFER)
                return 1
            if current == "connected":  # a crash between a cold transfer and the agent's END: end it
                self._move_agent(agent_id, iid, Transition.END)
                return 1
            return 0  # wrap-up stays the agent's own
        steps = {"connected": Transition.CONNECT, "wrap_up": Transition.END, "done": Transition.COMPLETE_WRAP_UP}
        missing = order[order.index(current) + 1 : order.index(target) + 1]
        for next_phase in missing:  # queued in order: a refused step makes the ones after it refused too
            self._move_agent(agent_id, iid, steps[next_phase], wrap_up_code="reconciled")
        return len(missing)

    def _reserve_again(self, interaction: Interaction) -> int:
        """An offer recorded but never reserved (a crash in between): reserve, or put it back."""
        iid, agent_id = interaction.interaction_id, interaction.agent_id
        self._unconfirmed.add(iid)
        recorded: Future[None] = Future()
        recorded.set_result(None)
        reservation = self._agents.send(agent_id, Transition.RESERVE, iid, channel=interaction.channel)
        reservation.add_done_callback(lambda outcome: self._reserved(iid, agent_id, recorded, outcome))
        return 1

    def standing_offers(self, agent_id: str) -> list[pb.Offer]:
        """Offers standing for the agent, for a desktop that (re)connects: only those the agent
        is known to hold (announced by this process, or reserved as the agent feed shows;
        after a crash, `reconcile` reserves the others again and announces them then)."""
        view = self._feed.views().get(agent_id)
        held = {w["interaction_id"] for w in view["work"]} if view else set()
        with self._lock:
            return [
                self._offer_message(i)
                for i in self._open.values()
                if i.status == S.OFFERED
                and i.agent_id == agent_id
                and (i.interaction_id in self._announced or i.interaction_id in held)
            ]

    # ---- routing ----

    def _candidates(self, now: float) -> tuple[dict[str, Candidate], dict[str, Agent]]:
        candidates: dict[str, Candidate] = {}
        agents: dict[str, Agent] = {}
        for agent_id, view in self._feed.views().items():
            if not (view["logged_in"] and view["ready"]) or self._cooldown.get(agent_id, 0) > now:
                continue
            if self._moving.get(agent_id, 0.0) > view["since"] and now - self._moving[agent_id] < MOVING_GRACE_S:
                continue  # an END is on its way to the agent (after-call work): wait until the feed shows it
            agent, skills = self._folded(view)
            known = {w.interaction_id for w in agent.work}
            pending = self._pending.get(agent_id, {})
            for iid in [iid for iid in pending if iid in known]:
                del pending[iid]  # the feed has caught up with our reservation
            extra = tuple(WorkItem(iid, channel, "reserved") for iid, channel in pending.items())
            agent = replace(agent, work=agent.work + extra)
            channels = frozenset(available_channels(agent))
            if not channels:
                continue
            agents[agent_id] = agent
            candidates[agent_id] = Candidate(
                agent_id=agent_id,
                skills=skills,
                channels=channels,
                idle_since=view["since"] if view["state"] == AgentState.READY else now,
                occupancy=self._occupancy(view, now),
                last_offer_at=self._last_offer_at.get(agent_id, 0.0),
            )
        return candidates, agents

    def _folded(self, view: state_view.View) -> tuple[Agent, dict[str, int]]:
        """The view as the domain's Agent, and its skills: kept per view version, because a
        routing pass runs on every change and most agents have not changed since the last."""
        agent_id, version = view["agent_id"], view["version"]
        kept = self._as_agent.get(agent_id)
        if kept is None or kept[0] != version:
            skills = {s["name"]: s["proficiency"] for s in view["skills"]}
            kept = self._as_agent[agent_id] = (version, state_view.as_agent(view), skills)
        return kept[1], kept[2]

    def _occupancy(self, view: state_view.View, now: float) -> float:
        if not self._needs_occupancy:  # closing the open intervals costs a deep copy per agent
            return 0.0
        tz = self._feed.tz
        current = state_view.up_to(view, now, tz)
        return float(state_view.day_counters(current, state_view.day_of(now, tz))["occupancy"])

    def route_once(self) -> int:
        with self._lock:
            now = self._clock().timestamp()
            waiting = [i for i in self._open.values() if i.status == S.QUEUED]
            if not waiting:
                return 0
            candidates, agents = self._candidates(now)
            if not candidates:
                return 0  # every agent is full or away: nothing to plan

            def after_offer(candidate: Candidate, channel: int) -> Candidate | None:
                agent = agents[candidate.agent_id]
                agent = replace(agent, work=(*agent.work, WorkItem(new_id(), channel, "reserved")))
                agents[candidate.agent_id] = agent
                room = frozenset(available_channels(agent))
                return replace(candidate, channels=room, last_offer_at=now) if room else None

            in_progress: dict[str, int] = defaultdict(int)
            for i in self._open.values():
                if i.status in (S.OFFERED, S.CONNECTED):
                    in_progress[i.queue_id] += 1
            matches = plan(waiting, self._queues, candidates, now, after_offer, in_progress)
            return sum(1 for m in matches if self._offer(m.interaction_id, m.agent_id, m.step))

    def _offer(self, iid: str, agent_id: str, step: int) -> bool:
        """Offer: recorded and reserved at once, announced once both hold.

        Reserving before the offer is durable saves a round trip; an agent reserved
        for an offer that then failed to be written is released (REJECT_OFFER), and
        the agents service refuses any reservation beyond capacity anyway."""
        interaction = self._open[iid]
        now = self._clock()
        deadline = now.timestamp() + self._queues[interaction.queue_id].offer_timeout_s
        events = domain.offer(interaction, agent_id, datetime.fromtimestamp(deadline, UTC), step)
        _, written = self._save(interaction, events)
        reservation = self._agents.send(agent_id, Transition.RESERVE, iid, channel=interaction.channel)
        self._unconfirmed.add(iid)
        self._pending[agent_id][iid] = interaction.channel
        self._last_offer_at[agent_id] = now.timestamp()
        written.add_done_callback(
            lambda _: reservation.add_done_callback(lambda _: self._reserved(iid, agent_id, written, reservation))
        )
        return True

    def _reserved(self, iid: str, agent_id: str, written: Future[None], outcome: Outcome) -> None:
        with self._lock:
            self._unconfirmed.discard(iid)
            if written.exception() is not None:  # the offer was not recorded: undo the reservation
                self._pending[agent_id].pop(iid, None)
                if outcome.exception() is None:
                    self._move_agent(agent_id, iid, Transition.REJECT_OFFER)
                return
            interaction = self._all.get(iid)
            standing = interaction is not None and interaction.status == S.OFFERED and interaction.agent_id == agent_id
            if outcome.exception() is None:
                if standing and interaction is not None:
                    self._announced.add(iid)
                    self._bus.publish(agent_id, self._offer_message(interaction))
                return  # else withdrawn meanwhile: its release follows the reservation in order
            log.info("reservation of %s for %s refused: %s", agent_id, iid, outcome.exception())
            self._cooldown[agent_id] = self._clock().timestamp() + REFUSAL_COOLDOWN_S
            self._pending[agent_id].pop(iid, None)
            if standing and interaction is not None:
                self._save(interaction, domain.end_offer(interaction, agent_id, "agent_unavailable"))
        self._wake.set()

    def expire_offers(self) -> int:
        with self._lock:
            now = self._clock().timestamp()
            expired = [i for i in self._open.values() if i.status == S.OFFERED and (i.expires_at or now) <= now]
            for interaction in expired:
                agent_id, iid = interaction.agent_id, interaction.interaction_id

                def then(agent_id: str = agent_id, iid: str = iid) -> None:
                    self._move_agent(agent_id, iid, Transition.MISS_OFFER)

                self._save(interaction, domain.end_offer(interaction, agent_id, "timed_out"), then=then)
                self._pending[agent_id].pop(iid, None)
            return len(expired)

    def _offer_message(self, interaction: Interaction) -> pb.Offer:
        offer = pb.Offer(
            interaction_id=interaction.interaction_id,
            queue_id=interaction.queue_id,
            channel=interaction.channel,  # type: ignore[arg-type]
            customer_id=interaction.customer_id,
            language=interaction.language,
            department=interaction.department,
            priority=interaction.priority,
            attributes=dict(interaction.attributes),
        )
        if interaction.expires_at:
            offer.expires_at.FromDatetime(datetime.fromtimestamp(interaction.expires_at, UTC))
        return offer

    # ---- supervisor side ----

    def queue_stats(self, queue_id: str) -> tuple[QueueConfig, QueueKpis, datetime, int, int]:
        """The queue's figures for today so far (since midnight in the contact center's
        time zone), its agents ready and busy."""
        queue = self._queues.get(queue_id)
        if queue is None:
            raise NotFound(f"queue {queue_id} does not exist")
        with self._lock:
            now = self._clock().timestamp()
            day, tally = self._tallies.today(queue_id, now)
            waiting = [i for i in self._open.values() if is_waiting(i, queue_id)]
        figures = kpis(queue, tally, waiting, now, self.sl_variant)
        since = datetime.combine(day, datetime.min.time(), self._tz)
        ready = busy = 0
        target = queue.targets[0]
        for view in self._feed.views().values():
            skills = {s["name"]: s["proficiency"] for s in view["skills"]}
            if not all(skills.get(skill, 0) >= target.min_proficiency for skill in target.skills):
                continue
            ready += view["state"] == AgentState.READY
            busy += view["state"] in (AgentState.RESERVED, AgentState.BUSY, AgentState.AFTER_CALL_WORK)
        return queue, figures, since, ready, busy

    def queue_ids(self) -> list[str]:
        return sorted(self._queues)
