"""Loyalty department.

Its API contract is proto/centralino/v1/loyalty.proto; the implementation follows in its own issue.
"""
