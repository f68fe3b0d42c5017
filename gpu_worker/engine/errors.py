"""Errors the engine front raises besides ``ValueError`` (invalid input stays ValueError).

The gRPC servicer maps them to status codes: QueueFullError -> RESOURCE_EXHAUSTED,
EngineClosedError -> UNAVAILABLE, EngineDeadError -> INTERNAL.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class of the engine front's own errors."""


class QueueFullError(EngineError):
    """More than ``EngineConfig.max_queue_len`` requests are already waiting."""


class EngineClosedError(EngineError):
    """The engine is draining or shut down and accepts no new requests."""


class EngineDeadError(EngineError):
    """A step of the engine core failed; in-flight requests were failed with this error."""
