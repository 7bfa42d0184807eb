"""Routing drives agents' states through the agents service (it owns capacity rules).

Steps go out in the order they are given, in batches (`ChangeStates`: one round
trip and one group commit on the agents side for many steps), from one sender
thread: an agent's steps can then never overtake each other (an END before the
CONNECT it follows), and the router never waits for the agents service while it
decides.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

import grpc
from centralino.v1 import agents_pb2, agents_pb2_grpc

MAX_BATCH = 500


class AgentRefused(Exception):
    """The agents service refused the change (agent not ready, at capacity, unknown, ...)."""


Outcome = Future[agents_pb2.ChangeStateResponse]


class AgentsPort:
    def __init__(self, channel: grpc.Channel, timeout_s: float = 5.0) -> None:
        self._stub = agents_pb2_grpc.AgentsServiceStub(channel)
        self._timeout_s = timeout_s
        self._queue: deque[tuple[agents_pb2.ChangeStateRequest, Outcome]] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def send(
        self, agent_id: str, transition: int, interaction_id: str, channel: int = 0, wrap_up_code: str = ""
    ) -> Outcome:
        """Queue one step; the future fails with AgentRefused, or grpc.RpcError if the service is out of reach.
        The agents service stamps the time: its own ordering check then never races ours."""
        request = agents_pb2.ChangeStateRequest(
            agent_id=agent_id,
            transition=transition,  # type: ignore[arg-type]
            interaction_id=interaction_id,
            channel=channel,  # type: ignore[arg-type]
            wrap_up_code=wrap_up_code,
            correlation_id=interaction_id,
        )
        outcome: Outcome = Future()
        with self._ready:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="agent-steps", daemon=True)
                self._thread.start()
            self._queue.append((request, outcome))
            self._ready.notify()
        return outcome

    def change(
        self, agent_id: str, transition: int, interaction_id: str, channel: int = 0, wrap_up_code: str = ""
    ) -> agents_pb2.ChangeStateResponse:
        """One step, in order after every step queued before it, waiting for its outcome."""
        return self.send(agent_id, transition, interaction_id, channel, wrap_up_code).result()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if self._stopping and not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            self._send_batch(batch)

    def _send_batch(self, batch: list[tuple[agents_pb2.ChangeStateRequest, Outcome]]) -> None:
        request = agents_pb2.ChangeStatesRequest(changes=[change for change, _ in batch])
        try:
            response = self._stub.ChangeStates(request, timeout=self._timeout_s)
        except grpc.RpcError as error:  # the agents service is out of reach: reconcile catches up later
            for _, outcome in batch:
                outcome.set_exception(error)
            return
        for (_, outcome), result in zip(batch, response.results, strict=True):
            if result.HasField("accepted"):
                outcome.set_result(result.accepted)
            else:
                outcome.set_exception(AgentRefused(f"{result.refused_code}: {result.refused_message}"))
