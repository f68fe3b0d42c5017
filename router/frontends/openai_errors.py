"""Errors of the OpenAI door: a router error becomes an HTTP status and OpenAI's error JSON.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with 400 for a bad
parameter (``param`` names it), 413 for a request body or a message to the workers over its size
limit (the message names the limit and its flag), 401 for a missing or unknown API key, 403 for
a model the key may not use, 404 for an unknown model, 429 when every worker is full or the key is over a rate
limit (then with ``Retry-After``), 503 when no worker can serve, 504 past the deadline, 500
otherwise. The gRPC status of a router
error (``router/errors.py``) decides the HTTP status, so the door follows the native API's rules.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import grpc

from router.errors import InvalidRequest, RateLimited, RequestTooLarge, ResponseNotFound, RouterError

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type, code)
_BY_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (400, "invalid_request_error", None),  # vLLM's, for a loaded adapter
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "model_not_allowed"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "server_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.CANCELLED: (499, "server_error", "cancelled"),
}
_INTERNAL = (500, "server_error", None)

# A worker's INVALID_ARGUMENT message starts with the field it refuses ("top_p must be in ...");
# these are the ones whose name is the same in the OpenAI API.
_SAME_NAME_PARAMS = frozenset({
    "n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
    "logit_bias", "logprobs", "model", "truncate_prompt_tokens", "prompt_logprobs",
    "allowed_token_ids", "bad_words", "chat_template_kwargs",
})
# ... and the names the worker gives the prompt (the router always sends it as token ids)
_PROMPT_NAMES = frozenset({"prompt", "prompt_token_ids", "messages"})
_LEADING_NAME = re.compile(r"^([a-z_]+)\b")


class InvalidParam(InvalidRequest):
    """A request parameter the door refuses: HTTP 400 naming ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class HttpError:
    """What the client gets for an exception (``headers``: ``Retry-After`` of a rate limit)."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def http_error(exc: BaseException, prompt_param: str = "prompt") -> HttpError:
    """HTTP status and OpenAI error body of an exception raised while serving a request.

    ``prompt_param`` is what the endpoint calls its input (``prompt``, ``messages``), named
    when a worker refuses the prompt (too long for the context, ids outside the vocabulary)."""
    if not isinstance(exc, RouterError):
        log.error("OpenAI request failed", exc_info=exc)
        status, kind, code = _INTERNAL
        return HttpError(status, error_body("internal router error", kind, None, code))
    if isinstance(exc, RateLimited):  # OpenAI's rate-limit error, with the wait in Retry-After
        kind = "requests" if exc.limit.endswith("rps") else "tokens"
        return HttpError(429, error_body(str(exc), kind, None, "rate_limit_exceeded"),
                         (("Retry-After", str(exc.retry_after_s)),))
    if isinstance(exc, RequestTooLarge):
        # the client may still be sending a body nobody reads: end the connection after the reply
        return HttpError(413, error_body(str(exc), "invalid_request_error", None, "request_too_large"),
                         (("Connection", "close"),))
    if isinstance(exc, ResponseNotFound):
        return HttpError(404, error_body(str(exc), "invalid_request_error", exc.param, "response_not_found"))
    status, kind, code = _BY_STATUS.get(exc.code, _INTERNAL)
    message = str(exc)
    param: str | None
    if isinstance(exc, InvalidParam):
        param = exc.param
    elif status == 404:
        param = "model"
    else:
        param = _param_in(message, prompt_param) if status == 400 else None
    return HttpError(status, error_body(message, kind, param, code))


def _param_in(message: str, prompt_param: str) -> str | None:
    match = _LEADING_NAME.match(message)
    name = match.group(1) if match else None
    if name in _PROMPT_NAMES:
        return prompt_param
    return name if name in _SAME_NAME_PARAMS else None


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_param(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the parameter path a client reads: ``messages[0].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).isidentifier() and str(part) not in _TYPE_TAGS:
            out += f".{part}" if out else str(part)
    return out


# Union-member tags pydantic puts in error locations (``("prompt", "str")``): not parameter names.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})
