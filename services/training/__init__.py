"""Training department.

Its API contract is proto/centralino/v1/training.proto; the implementation follows in its own issue.
"""
