"""Routing domain: queues, the Interaction aggregate, matching.  Pure: no IO here."""
