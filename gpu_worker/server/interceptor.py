"""The one server interceptor: turns exceptions raised by handlers into gRPC statuses.

Every RPC of the worker goes through it. Domain errors (``errors.py``) and engine errors
become their status code with a message naming the problem; anything else becomes
INTERNAL with a generic message, and the stack trace goes to the log only. A handler
cancelled by the client or by an expired deadline is logged and re-raised, so grpc
reports CANCELLED / DEADLINE_EXCEEDED to the caller.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, cast

import grpc

from gpu_worker.server.errors import status_for

logger = logging.getLogger(__name__)

_UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps handler exceptions to statuses for unary-unary and unary-stream methods."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(cast(_UnaryBehavior, handler.unary_unary), method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # streaming-request methods: none in our services


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("%s failed", method, exc_info=exc)
    else:
        logger.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


def _log_cancel(context: grpc.aio.ServicerContext, method: str) -> None:
    remaining = context.time_remaining()
    reason = "deadline exceeded" if remaining is not None and remaining <= 0 else "cancelled by the client"
    logger.info("%s %s", method, reason)


def _wrap_unary(behavior: _UnaryBehavior, method: str) -> _UnaryBehavior:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except asyncio.CancelledError:
            _log_cancel(context, method)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point of this interceptor
            await _abort(context, method, exc)

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """Wrap a stream handler, keeping its kind: our servicers' handlers are async generators
    (the tracing interceptor, installed before this one, can only wrap those); grpc's health
    Watch is a coroutine writing with ``context.write`` (and is never traced)."""
    if inspect.isasyncgenfunction(behavior):
        return _wrap_async_generator(behavior, method)
    return _wrap_unary(behavior, method)  # a coroutine handler: same error handling as unary


def _wrap_async_generator(
    behavior: Callable[..., AsyncGenerator[Any, None]], method: str
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async with aclosing(behavior(request, context)) as messages:
                async for message in messages:
                    yield message
        except asyncio.CancelledError:
            _log_cancel(context, method)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point of this interceptor
            await _abort(context, method, exc)

    return wrapped
