"""What the job service refuses, in its own terms; `app.py` maps each to an HTTP status once.

The message (`detail`) is the whole answer: it says what was wrong and what to do instead.
"""
from __future__ import annotations


class ServiceError(Exception):
    """A request the job service cannot carry out; `detail` is the message for the client."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    """No such job, stack file or model preset."""


class Conflict(ServiceError):
    """The job is in the wrong state for this (already finished, no finished stack)."""


class QueueFull(ServiceError):
    """The queue holds its limit of waiting jobs."""


class ShuttingDown(ServiceError):
    """The server is stopping (or not started yet) and takes no new jobs."""
