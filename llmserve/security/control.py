"""Who may call a worker's internal ``llmserve.v1.WorkerControl`` (Drain, GetWorkerInfo,
GetTokenizer): an authenticated router, i.e. a peer whose client certificate the worker verified
against the fleet CA (mutual TLS, ``--tls-ca``), or a caller on the worker's own host (loopback:
the drain hook of its pod, an operator on the machine). Anyone else gets UNAUTHENTICATED, unless
the worker was told to serve the control service to any peer (``--allow-remote-control``: only
on a private network without TLS, as the Compose and Kubernetes examples are).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from llmserve.security.tls import peer_has_verified_certificate, peer_is_loopback

log = logging.getLogger(__name__)

CONTROL_PREFIX = "/llmserve.v1.WorkerControl/"
REFUSED = ("WorkerControl is only served to routers with a fleet client certificate (mutual TLS) "
           "and to callers on the worker's host")


def control_allowed(context: grpc.aio.ServicerContext, allow_remote: bool) -> bool:
    """Whether the peer of ``context`` may call WorkerControl."""
    return allow_remote or peer_has_verified_certificate(context) or peer_is_loopback(context.peer())


class ControlAccessInterceptor(grpc.aio.ServerInterceptor):
    """Refuses WorkerControl calls from peers that are neither mTLS-authenticated nor local."""

    def __init__(self, allow_remote: bool = False) -> None:
        self._allow_remote = allow_remote

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(CONTROL_PREFIX):
            return handler  # WorkerControl's methods are all unary
        behavior = handler.unary_unary
        method = details.method
        allow_remote = self._allow_remote

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not control_allowed(context, allow_remote):
                log.warning("refused %s from %s: not an authenticated router", method, context.peer())
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
