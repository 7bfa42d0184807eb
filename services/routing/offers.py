"""Offer delivery to agents' StreamOffers streams."""

from __future__ import annotations

import queue
import threading
from collections import defaultdict

from centralino.v1 import routing_pb2 as pb


class OfferBus:
    def __init__(self) -> None:
        self._streams: dict[str, set[queue.Queue[pb.Offer]]] = defaultdict(set)
        self._lock = threading.Lock()

    def subscribe(self, agent_id: str) -> queue.Queue[pb.Offer]:
        stream: queue.Queue[pb.Offer] = queue.Queue()
        with self._lock:
            self._streams[agent_id].add(stream)
        return stream

    def unsubscribe(self, agent_id: str, stream: queue.Queue[pb.Offer]) -> None:
        with self._lock:
            self._streams[agent_id].discard(stream)

    def publish(self, agent_id: str, offer: pb.Offer) -> int:
        """Deliver to every open stream of the agent (desktop and softphone); returns how many."""
        with self._lock:
            streams = list(self._streams.get(agent_id, ()))
        for stream in streams:
            stream.put(offer)
        return len(streams)
