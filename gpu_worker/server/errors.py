"""Domain errors of the worker service and the one table that maps them to gRPC status codes.

Handlers raise these (or the engine's own ``ValueError`` / ``QueueFullError`` /
``EngineClosedError``); :func:`status_for` is the only place that knows which status
code each one becomes. The interceptor in ``interceptor.py`` applies it.
"""

from __future__ import annotations

import asyncio

import grpc

from gpu_worker.engine.errors import EngineClosedError, EngineDeadError, QueueFullError
from gpu_worker.lora.registry import LoraUpdateError


class WorkerError(Exception):
    """Base of the errors a client may see; the message is sent as the status details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(WorkerError):
    """The request is malformed: missing input, bad parameters, bad token ids."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(WorkerError):
    """The request names a model this worker does not serve."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(f"model {model!r} is not served here; served models: {served}")


class Overloaded(WorkerError):
    """A limit is reached (queue length, concurrent streams): retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NoTokenizer(WorkerError):
    """The model is served without a tokenizer: clients (and routers) must send token ids."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} is served without a tokenizer (skip_tokenizer_init): "
            "send prompt_token_ids and read token_ids"
        )


class Unavailable(WorkerError):
    """The worker cannot take requests right now (still loading, draining, engine closed)."""

    code = grpc.StatusCode.UNAVAILABLE


# Engine errors by type; anything else the engine raises is INTERNAL.
_ENGINE_ERROR_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineClosedError, grpc.StatusCode.UNAVAILABLE),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),  # the engine loop crashed: try another worker
)

# A refused runtime LoRA load or unload, by its kind.
_LORA_UPDATE_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "conflict": grpc.StatusCode.ALREADY_EXISTS,
    "full": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-visible message for an exception raised by a handler.

    Unknown exceptions become INTERNAL with a generic message: details (and the stack
    trace) are logged by the caller, never sent to the client.
    """
    if isinstance(exc, WorkerError):
        return exc.code, str(exc)
    if isinstance(exc, LoraUpdateError):
        return _LORA_UPDATE_CODES[exc.kind], str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or "invalid request"
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    for klass, code in _ENGINE_ERROR_CODES:
        if isinstance(exc, klass):
            return code, str(exc) or klass.__name__
    return grpc.StatusCode.INTERNAL, "internal error (see the worker's log)"
