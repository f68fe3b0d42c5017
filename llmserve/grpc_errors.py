"""The server interceptor that turns exceptions raised by handlers into gRPC statuses.

Worker and router each install one, with their own ``status_for`` (their ``errors.py``):
domain errors become their status code with a message naming the problem; anything else
becomes INTERNAL with a generic message, and the stack trace goes to the log only. A handler
cancelled by the client or by an expired deadline (or, a stream handler, closed at its yield
because the call ended) is logged and re-raised, so grpc reports
CANCELLED / DEADLINE_EXCEEDED to the caller. Torch-free: the router imports it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from types import TracebackType
from typing import Any, cast

import grpc

_UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StatusFor = Callable[[BaseException], tuple[grpc.StatusCode, str]]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps handler exceptions to statuses for unary-unary and unary-stream methods.

    ``status_for`` gives the status code and client-visible message of an exception;
    ``logger`` receives the log lines (stack traces of INTERNAL errors included).
    """

    def __init__(self, status_for: StatusFor, logger: logging.Logger) -> None:
        self._errors = _Errors(status_for, logger)

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
                _wrap_unary(cast(_UnaryBehavior, handler.unary_unary), method, self._errors),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, self._errors),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # streaming-request methods: none in our services


class _Errors:
    """What the wrappers do with an exception: map, log, abort."""

    def __init__(self, status_for: StatusFor, logger: logging.Logger) -> None:
        self.status_for = status_for
        self.logger = logger

    async def abort(self, context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
        code, message = self.status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            self.logger.error("%s failed", method, exc_info=exc)
        else:
            self.logger.info("%s -> %s: %s", method, code.name, message)
        # An exception may carry trailers for the client (a tuple attribute, e.g. ``retry-after``
        # of a rate limit; grpc's own errors have a method of that name, which is not sent).
        trailers = getattr(exc, "trailing_metadata", ())
        await context.abort(code, message, trailing_metadata=trailers if isinstance(trailers, tuple) else ())

    def log_cancel(self, context: grpc.aio.ServicerContext, method: str) -> None:
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        reason = "deadline exceeded" if expired else "cancelled by the client"
        self.logger.info("%s %s", method, reason)

    def handling(self, context: grpc.aio.ServicerContext, method: str) -> _Handling:
        """The handler's body runs inside this: see :class:`_Handling`."""
        return _Handling(self, context, method)


class _Handling:
    """Async context manager around one handler call: a cancellation is logged and re-raised,
    an abort passes through, any other exception aborts the call with its mapped status."""

    __slots__ = ("_errors", "_context", "_method")

    def __init__(self, errors: _Errors, context: grpc.aio.ServicerContext, method: str) -> None:
        self._errors = errors
        self._context = context
        self._method = method

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None or isinstance(exc, grpc.aio.AbortError):
            return False
        # GeneratorExit: a stream handler closed at its yield because the call ended while its
        # message waited to be sent (grpc.aio closes it so): a cancellation all the same.
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self._errors.log_cancel(self._context, self._method)
            return False
        if isinstance(exc, Exception):  # the point of this interceptor
            await self._errors.abort(self._context, self._method, exc)  # raises AbortError
            return True
        return False


def _wrap_unary(behavior: _UnaryBehavior, method: str, errors: _Errors) -> _UnaryBehavior:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with errors.handling(context, method):
            return await behavior(request, context)
        return None  # only if a mapped exception was suppressed without abort() raising

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], method: str, errors: _Errors) -> Callable[..., Any]:
    """Wrap a stream handler, keeping its kind: our servicers' handlers are async generators
    (the tracing interceptor, installed before this one, can only wrap those); grpc's health
    Watch is a coroutine writing with ``context.write`` (and is never traced)."""
    if inspect.isasyncgenfunction(behavior):
        return _wrap_async_generator(behavior, method, errors)
    return _wrap_unary(behavior, method, errors)  # a coroutine handler: same error handling as unary


def _wrap_async_generator(
    behavior: Callable[..., AsyncGenerator[Any, None]], method: str, errors: _Errors
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with errors.handling(context, method), aclosing(behavior(request, context)) as messages:
            async for message in messages:
                yield message

    return wrapped
