"""Crm department.

Its API contract is proto/centralino/v1/crm.proto; the implementation follows in its own issue.
"""
