"""Errors the engine front raises besides ``ValueError`` (invalid input stays ValueError).

The gRPC servicer maps them to status codes: QueueFullError -> RESOURCE_EXHAUSTED,
EngineClosedError -> UNAVAILABLE, EngineDeadError -> INTERNAL.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class of the engine front's own errors."""


class QueueFullError(EngineError):
    """The waiting queue has no room for the request's sequences or tokens (retry later or
    elsewhere). ``limit`` names the setting that refused it: ``max_queue_len`` (sequences) or
    ``max_queued_tokens``."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class EngineClosedError(EngineError):
    """The engine is draining or shut down and accepts no new requests."""


class EngineDeadError(EngineError):
    """A step of the engine core failed; in-flight requests were failed with this error."""
