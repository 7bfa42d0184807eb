"""Training department: see proto/centralino/v1/training.proto for its API contract (implementation follows in its own issue)."""
