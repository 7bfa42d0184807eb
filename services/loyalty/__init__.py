"""Loyalty department: see proto/centralino/v1/loyalty.proto for its API contract (implementation follows in its own issue)."""
