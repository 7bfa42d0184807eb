"""Domain errors, free of any transport: the api layer maps them to gRPC status codes."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a command can be refused with.

    `details` travel to the caller as trailing metadata (e.g. the field at fault,
    the aggregate's current state), so clients need not parse the message.
    """

    details: dict[str, str] = {}


class InvalidField(DomainError):
    """A command field is malformed; `field` names it so the caller can fix it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.details = {"field": field}


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class PreconditionFailed(DomainError):
    """The command is well formed but illegal in the aggregate's current state."""

    def __init__(self, message: str, current_state: str = "") -> None:
        super().__init__(message)
        self.details = {"current-state": current_state} if current_state else {}


class ConcurrencyConflict(DomainError):
    """Another writer appended to the same aggregate first; the caller may retry."""
