"""Crm department: see proto/centralino/v1/crm.proto for its API contract (implementation follows in its own issue)."""
