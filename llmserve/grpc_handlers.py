"""Rewrapping a gRPC method handler inside a server interceptor: the same kind and (de)serializers
around another behavior, or one that refuses the call. Torch-free: the router imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

_KINDS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function a handler runs, whatever its kind."""
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary  # type: ignore[return-value]
            or handler.stream_stream)


def with_behavior(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as ``handler`` running ``behavior``."""
    for kind, make in _KINDS.items():
        if getattr(handler, kind) is not None:
            return make(behavior, request_deserializer=handler.request_deserializer,  # type: ignore[operator]
                        response_serializer=handler.response_serializer)
    return handler


def refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """``handler``'s shape, answering every call with ``code`` and ``message``. A stream handler
    written as an async generator gets one (the tracing interceptor wraps only those)."""
    streams = handler.unary_stream is not None or handler.stream_stream is not None
    if streams and inspect.isasyncgenfunction(behavior_of(handler)):
        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(code, message)
            yield  # pragma: no cover - abort raises

        return with_behavior(handler, refuse_stream)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    return with_behavior(handler, refuse)
