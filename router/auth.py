"""API-key authentication at the router's doors: a gRPC server interceptor and an ASGI
middleware for the HTTP door. Both read ``authorization: Bearer <key>``, refuse a missing,
unknown or revoked key (gRPC UNAUTHENTICATED; HTTP 401 with OpenAI's error JSON) and mark the
call as acting for the key (``access.act_as``), for the model and rate checks of the request path.

Open without a key: gRPC health and reflection, KServe ``ServerLive`` / ``ServerReady`` (probes),
and HTTP ``/health``. Everything else (``llmserve.v1.Generation``, the rest of KServe, the OpenAI
API including ``/v1/models``) needs a key when the router has a key file.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

from llmserve.grpc_handlers import behavior_of, refusing, with_behavior
from llmserve.grpc_limits import HEALTH_PREFIX, is_health_check
from llmserve.security.api_keys import ApiKey, bearer_token
from router.access import AccessControl, act_as
from router.errors import Unauthenticated
from router.frontends.openai_errors import error_body

OPEN_GRPC_PREFIXES = (
    HEALTH_PREFIX,
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
PROBE_GRPC_METHODS = frozenset({
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
})
OPEN_HTTP_PATHS = frozenset({"/health"})


def _is_open(method: str) -> bool:
    return method in PROBE_GRPC_METHODS or method.startswith(OPEN_GRPC_PREFIXES)


def is_probe(method: str) -> bool:
    """gRPC's health check and KServe's liveness / readiness: answered by a full port."""
    return method in PROBE_GRPC_METHODS or is_health_check(method)


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but the open ones; install it after the error interceptor."""

    def __init__(self, access: AccessControl) -> None:
        self._access = access

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or _is_open(details.method):
            return handler
        try:
            key = self._access.authenticate(bearer_token(_authorization(details.invocation_metadata)))
        except Unauthenticated as exc:
            return refusing(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return with_behavior(handler, _acting_for(handler, key))


def _acting_for(handler: grpc.RpcMethodHandler, key: ApiKey) -> Callable[..., Any]:
    """The handler's behavior, run as ``key`` (its kind kept: async generator or coroutine)."""
    behavior = behavior_of(handler)
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            act_as(key)
            async with aclosing(behavior(request, context)) as messages:
                async for message in messages:
                    yield message

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        act_as(key)
        return await behavior(request, context)

    return call


# -- HTTP ------------------------------------------------------------------------------------

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class ApiKeyMiddleware:
    """ASGI middleware of the OpenAI door: ``Authorization: Bearer <key>`` on every path but
    ``/health``; a refusal is HTTP 401 with OpenAI's error JSON."""

    def __init__(self, app: ASGIApp, access: AccessControl) -> None:
        self._app = app
        self._access = access

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_HTTP_PATHS:
            await self._app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        header = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None)
        try:
            key = self._access.authenticate(bearer_token(header))
        except Unauthenticated as exc:
            await _send_401(send, str(exc), missing=header is None)
            return
        act_as(key)  # uvicorn runs each request in its own task
        await self._app(scope, receive, send)


async def _send_401(send: Any, message: str, missing: bool) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", None,
                                 None if missing else "invalid_api_key")).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
