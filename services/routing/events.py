"""Routing event types: stable names and schema versions (payloads live in proto/)."""

from __future__ import annotations

from centralino.v1 import routing_pb2 as pb

from services.kernel.envelope import EventRegistry, EventType

INTERACTION = "Interaction"

REGISTRY = EventRegistry(
    [
        EventType("routing.InteractionCreated", pb.InteractionCreated),
        EventType("routing.InteractionOffered", pb.InteractionOffered),
        EventType("routing.OfferAccepted", pb.OfferAccepted),
        EventType("routing.OfferEnded", pb.OfferEnded),
        EventType("routing.InteractionEnded", pb.InteractionEnded),
        EventType("routing.InteractionCompleted", pb.InteractionCompleted),
        EventType("routing.InteractionTransferred", pb.InteractionTransferred),
        EventType("routing.InteractionAbandoned", pb.InteractionAbandoned),
        EventType("routing.InteractionCancelled", pb.InteractionCancelled),
    ]
)
