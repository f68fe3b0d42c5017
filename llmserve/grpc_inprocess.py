"""In-process gRPC: a server's handlers called from the same event loop, with no transport.

When a router and a worker share a process (``llmserve up``), the router's calls to that worker
need not cross HTTP/2 on loopback: :class:`InProcessServer` holds the worker's servicers and
server interceptors, and :class:`InProcessChannel` is a ``grpc.aio.Channel`` to it, so the
generated stubs, the caller's client interceptors and every line of the caller's retry,
deadline and cancellation code stay the same. What a call does, as over gRPC:

- the server interceptor chain is resolved per call exactly as ``grpc.aio`` does (first
  interceptor outermost), and the handler runs in a task of its own, started in an *empty*
  ``contextvars`` context: nothing of the caller's context leaks in, so trace context reaches
  the handler only through the metadata (W3C ``traceparent``), as over the wire;
- ``timeout`` is a deadline: the handler sees it in ``context.time_remaining()``; when it passes,
  the call ends with DEADLINE_EXCEEDED and the handler task is cancelled (its ``finally``
  blocks run, e.g. the engine aborts the request and frees its KV blocks);
- ``call.cancel()`` ends the call with CANCELLED and cancels the handler task likewise;
- a handler's ``context.abort(code, details, trailers)`` reaches the caller as an
  ``AioRpcError`` with that code, details and trailing metadata; any other exception as UNKNOWN;
- a stream handler runs at most one unread message ahead of its caller (``Rpc.send``, the
  twin of HTTP/2 flow control): a slow caller gets fewer, larger messages, not a backlog;
- :meth:`InProcessServer.stop` refuses new calls (UNAVAILABLE), gives running ones ``grace``
  seconds, then cancels them (UNAVAILABLE).

What differs, by design: messages are handed over as objects, not serialized (neither side may
mutate a message after handing it over: the router forwards chunks as they are, the worker
builds a new one per chunk); no transport limits apply (message and metadata sizes: the caller
applied its own on what it received); the peer is ``unix:in-process``, a local caller (a worker
serves ``WorkerControl`` to it as to a loopback or Unix-socket peer), with no TLS auth context.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from llmserve._inprocess_call import LOCAL_PEER, CallBase, Metadatum, Rpc, UnaryStreamCall, UnaryUnaryCall

__all__ = ["LOCAL_PEER", "InProcessChannel", "InProcessServer"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class _HandlerCallDetails(grpc.HandlerCallDetails):  # type: ignore[misc]
    method: str
    invocation_metadata: tuple[Metadatum, ...]


class InProcessServer:
    """The in-process twin of a ``grpc.aio.Server``: register servicers with the generated
    ``add_*Servicer_to_server(servicer, server)`` functions, as on the real server, with the
    same ``interceptors``."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self._generic: list[grpc.GenericRpcHandler] = []
        self._interceptors = tuple(interceptors)
        self._rpcs: set[Rpc] = set()
        self._stopped = False

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
        """Accepted for the generated code; the generic handlers registered with them serve."""

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls; wait up to ``grace`` seconds (None: none) for running ones, then end
        them with UNAVAILABLE, as ``grpc.aio.Server.stop`` does."""
        self._stopped = True
        tasks = [rpc.task for rpc in self._rpcs if rpc.task is not None]
        if tasks and grace:
            await asyncio.wait(tasks, timeout=grace)
        for rpc in list(self._rpcs):
            rpc.terminate(grpc.StatusCode.UNAVAILABLE, "Cancelling all calls: the server stopped")
        if tasks:
            await asyncio.wait(tasks)

    async def _find_handler(self, details: _HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The method's handler through the interceptor chain, as ``grpc.aio``'s server resolves it."""

        def query(call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            for generic in self._generic:
                handler = generic.service(call_details)
                if handler is not None:
                    return handler
            return None

        async def run(index: int, call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if index == len(self._interceptors):
                return query(call_details)
            return await self._interceptors[index].intercept_service(functools.partial(run, index + 1),
                                                                     call_details)

        return await run(0, details)

    def start(self, rpc: Rpc, method: str, request: Any, timeout: float | None, metadata: Any,
              streaming: bool) -> None:
        """Open ``rpc`` (its deadline and metadata) and run the method's handler for it."""
        rpc.open(timeout, metadata)
        if self._stopped:
            rpc.terminate(grpc.StatusCode.UNAVAILABLE, "the in-process server is stopped")
        if rpc.done():  # cancelled before it started, the deadline already passed, or refused
            return
        self._rpcs.add(rpc)
        # An empty context, as a handler of grpc.aio's server gets: trace context only via metadata.
        rpc.task = asyncio.get_running_loop().create_task(
            self._serve(rpc, method, request, streaming), context=contextvars.Context())
        rpc.task.add_done_callback(lambda _: self._rpcs.discard(rpc))

    async def _serve(self, rpc: Rpc, method: str, request: Any, streaming: bool) -> None:
        context = rpc.context
        try:
            handler = await self._find_handler(_HandlerCallDetails(method, context.invocation_metadata()))
            behavior = None
            if handler is not None:
                behavior = handler.unary_stream if streaming else handler.unary_unary
            if behavior is None:
                rpc.finish(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
                return
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):  # an async generator: our servicers' stream handlers
                messages: AsyncIterator[Any] = result
                try:
                    async for message in messages:
                        await rpc.send(message)
                except asyncio.CancelledError as cancel:
                    await _cancel_inside(result, cancel)
                    raise
                finally:
                    await result.aclose()
            else:  # a coroutine: unary, or a stream written with context.write
                response = await result
                if not streaming:
                    rpc.deliver(response)
            rpc.finish(context.code_set or grpc.StatusCode.OK, context.details_set)
        except grpc.aio.AbortError:
            rpc.finish(context.code_set or grpc.StatusCode.UNKNOWN, context.details_set)
        except asyncio.CancelledError:  # cancel(), deadline, stop(): the status is already set
            rpc.finish(grpc.StatusCode.CANCELLED, "the handler was cancelled")
        except Exception as exc:  # grpc.aio's server answers an uncaught exception the same way
            log.exception("in-process %s failed", method)
            rpc.finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")


async def _cancel_inside(handler: Any, cancel: asyncio.CancelledError) -> None:
    """Deliver ``cancel``, caught while a stream handler waited for its reader (``Rpc.send``),
    inside the handler, as if it had been cancelled there.

    Throwing it in at the handler's ``yield`` reaches only the outermost generator of an
    interceptor chain: a wrapper that iterates its inner generator with ``async for`` (as
    OpenTelemetry's server interceptor does) does not pass the exception on, and the inner
    generators are left for the garbage collector to close later, in another task and context
    (no "deadline exceeded" log line, the engine's abort out of order, OpenTelemetry's context
    detach failing). So the cancellation is armed again on this task and the handler resumed:
    it is raised where the handler next waits (the engine's output), at the bottom of the chain,
    and goes up through every wrapper in this task. Only a handler that yields again without
    waiting gets it at that ``yield``."""
    task = asyncio.current_task()
    assert task is not None
    if hasattr(task, "uncancel"):  # Python >= 3.11: the one cancellation, armed again, not a second
        task.uncancel()
    task.cancel()
    try:
        await handler.__anext__()  # raises the cancellation from where the handler waits
    except StopAsyncIteration:
        return
    try:
        await handler.athrow(cancel)  # it yielded without waiting: the cancellation reaches that yield
    except StopAsyncIteration:
        pass


class InProcessChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` to an :class:`InProcessServer`, for the generated stubs.

    ``interceptors`` are the caller's client interceptors (unary-unary and unary-stream ones), run
    as ``grpc.aio`` runs them (first outermost); they may change the call's details (metadata,
    timeout) and watch the call they get back, which is the one the stub returns. A chain that
    suspends runs in a task started in the caller's context, so the call is returned at once
    (a CLIENT span stays a child of the caller's span). Closing the channel changes nothing:
    the server's owner stops it."""

    def __init__(self, server: InProcessServer, interceptors: Sequence[Any] = ()) -> None:
        self._server = server
        stream, unary = grpc.aio.UnaryStreamClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor
        self._stream_interceptors = [i for i in interceptors if isinstance(i, stream)]
        self._unary_interceptors = [i for i in interceptors if isinstance(i, unary)]
        self._chains: set[asyncio.Task[Any]] = set()  # strong references until each chain ends

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> grpc.aio.UnaryStreamMultiCallable:  # type: ignore[type-arg]
        return _UnaryStreamMultiCallable(self, method)

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: bool | None = False) -> grpc.aio.UnaryUnaryMultiCallable:  # type: ignore[type-arg]
        return _UnaryUnaryMultiCallable(self, method)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("in-process channels serve unary requests only")

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("in-process channels serve unary requests only")

    def invoke(self, method: str, request: Any, timeout: float | None, metadata: Any,
               streaming: bool) -> CallBase:
        """Start one call; the stub's multi-callables come here."""
        rpc = Rpc()
        call: CallBase = UnaryStreamCall(rpc) if streaming else UnaryUnaryCall(rpc)
        interceptors: list[Any] = self._stream_interceptors if streaming else self._unary_interceptors
        if not interceptors:
            self._server.start(rpc, method, request, timeout, metadata, streaming)
            return call
        loop = asyncio.get_running_loop()
        created = loop.time()

        async def run(index: int, details: grpc.aio.ClientCallDetails, message: Any) -> Any:
            if index == len(interceptors):  # the chain's end: the call starts, with the details it made
                elapsed = loop.time() - created
                remaining = None if details.timeout is None else details.timeout - elapsed
                name = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
                self._server.start(rpc, name, message, remaining, details.metadata, streaming)
                return call
            interceptor, next_step = interceptors[index], functools.partial(run, index + 1)
            if streaming:
                return await interceptor.intercept_unary_stream(next_step, details, message)
            return await interceptor.intercept_unary_unary(next_step, details, message)

        details = grpc.aio.ClientCallDetails(method, timeout, metadata, None, None)  # type: ignore[arg-type]
        chain = loop.create_task(run(0, details, request))
        self._chains.add(chain)
        chain.add_done_callback(functools.partial(self._chain_done, rpc))
        return call

    def _chain_done(self, rpc: Rpc, chain: asyncio.Task[Any]) -> None:
        self._chains.discard(chain)
        if chain.cancelled() or chain.exception() is not None:
            error = "cancelled" if chain.cancelled() else repr(chain.exception())
            rpc.terminate(grpc.StatusCode.UNKNOWN, f"a client interceptor failed: {error}")

    async def close(self, grace: float | None = None) -> None:
        return None

    async def __aenter__(self) -> InProcessChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.SHUTDOWN if self._server.stopped else grpc.ChannelConnectivity.READY

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        raise NotImplementedError("an in-process channel has no connection to watch")

    async def channel_ready(self) -> None:
        return None


class _InProcessCallable:
    """One method of an :class:`InProcessChannel`; ``streaming``: a server-streaming method."""

    streaming = False

    def __init__(self, channel: InProcessChannel, method: str) -> None:
        self._channel = channel
        self._method = method

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Any = None,
                 credentials: Any = None, wait_for_ready: bool | None = None,
                 compression: Any = None) -> Any:
        return self._channel.invoke(self._method, request, timeout, metadata, streaming=self.streaming)


class _UnaryStreamMultiCallable(_InProcessCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    streaming = True


class _UnaryUnaryMultiCallable(_InProcessCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    streaming = False
