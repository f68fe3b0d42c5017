"""Domain errors of the router and the one table mapping them to gRPC status codes.

Handlers raise these; ``interceptor.py`` turns them into statuses with the message as details.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable

import grpc

_SHOWN_NAME_CHARS = 200


def model_name(model: str) -> str:
    """``model`` quoted for an error message, cut past 200 characters (a name echoed whole could
    push the reply's trailers past the client's metadata limit, hiding the real status)."""
    if len(model) <= _SHOWN_NAME_CHARS:
        return repr(model)
    return f"{model[:_SHOWN_NAME_CHARS]!r}... ({len(model)} characters)"

class RouterError(Exception):
    """Base of the errors a client may see; the message is sent as the status details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(RouterError):
    """Malformed request: no model, no input, an input the tokenizer rejects."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitRefused(InvalidRequest):
    """A request over one of the router's admission limits (``llmserve.limits``); ``limit`` names
    the setting, the label of ``llmserve:router_refusals_total``."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class RequestTooLarge(LimitRefused):
    """A request whose size in bytes is over a limit (HTTP 413 on the OpenAI door)."""

    def __init__(self, what: str, size: int | None, limit: str, limit_bytes: int, flag: str) -> None:
        size_text = f"{size} bytes" if size is not None else f"more than {limit_bytes} bytes"
        super().__init__(limit, f"{what} is too large: {size_text}; the limit is {limit_bytes} bytes "
                                f"({limit}, flag {flag})")


class NoTokenizer(InvalidRequest):
    """The model's workers serve it without a tokenizer: only ``prompt_token_ids`` can be routed."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model_name(model)}: this model has no tokenizer: send prompt_token_ids")


class ModelNotFound(RouterError):
    """No worker has ever served this model."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str, live: Iterable[str]) -> None:
        super().__init__(f"model {model_name(model)} is not served by any worker; "
                         f"available models: {sorted(live)}")


class ModelUnavailable(RouterError):
    """The model was served, but no worker of it is live (or every attempt failed)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, model: str, why: str = "all of its workers are gone") -> None:
        super().__init__(f"model {model_name(model)} is unavailable: {why}")


class WorkersBusy(RouterError):
    """Every candidate worker is over its queue limit (as the registry says), or every worker
    tried refused the request with RESOURCE_EXHAUSTED (``reason``: the last one's words, which
    name its limit: the queue, its streams or calls in flight)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, model: str, reason: str | None = None) -> None:
        workers = f"every worker of model {model_name(model)}"
        if reason is None:
            super().__init__(f"{workers} is over its queue limit; retry later")
        else:
            super().__init__(f"{workers} tried is busy (the last: {reason[:300]}); retry later")


class Unauthenticated(RouterError):
    """No API key, or one the router does not know (or has revoked)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RouterError):
    """The caller's API key may not use this model."""

    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(RouterError):
    """The caller's API key is over one of its rate limits; ``retry_after_s`` says when it would
    fit (sent as the ``retry-after`` trailer in whole seconds, HTTP's ``Retry-After``)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, limit: str, retry_after_s: float) -> None:
        self.limit = limit
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(f"rate limit {limit} exceeded for this API key; retry after {self.retry_after_s}s")

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", str(self.retry_after_s)),)


class ResponseNotFound(RouterError):
    """No stored response of this id that the caller may read (``param``: where the id came from)."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, response_id: str, param: str | None) -> None:
        super().__init__(f"response {response_id[:64]!r} not found")
        self.param = param


class StoreDown(RouterError):
    """The state store holding shared documents (stored responses) could not be reached."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, what: str) -> None:
        super().__init__(f"the state store is unavailable: {what}; retry later")


class BackgroundFull(RouterError):
    """The router runs as many background responses as its limit allows."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, limit: int) -> None:
        super().__init__(f"this router runs {limit} background responses, its limit "
                         f"(max_background_responses, flag --max-background-responses); retry later")


class UpstreamError(RouterError):
    """A worker's error that the router passes through unchanged (after the first token, or
    a non-retryable status such as INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-visible message for an exception raised by a handler."""
    if isinstance(exc, RouterError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal router error"


def cancelled_by_caller() -> bool:
    """Is the running task being cancelled (its client went away, the server stops)?

    Call it while handling ``asyncio.CancelledError``: grpc.aio also raises one in a task that
    nobody cancelled, when the channel of a call is closed under it; that one is a failure of
    the call (UNAVAILABLE), not a cancellation, and must not be passed on as one."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
