"""Routing department: see proto/centralino/v1/routing.proto for its API contract (implementation follows in its own issue)."""
