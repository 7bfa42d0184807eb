"""Routing department.

Its API contract is proto/centralino/v1/routing.proto; the implementation follows in its own issue.
"""
