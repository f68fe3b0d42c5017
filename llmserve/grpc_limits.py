"""Limits of a gRPC port on its connections and calls, shared by the router and the worker.
Torch-free: the router imports it.

gRPC's defaults leave a port open to cheap abuse: a TCP connection that never completes its
HTTP/2 handshake is held for 120 s, one that makes no call is held forever, connections are not
counted, and a call whose request message never arrives (headers sent, the body held back, or
the stream ended without one) never reaches a handler: grpc.aio waits for the message without
end and, for a stream ended without one, never answers at all, so the call stays open as long
as its connection. No limit of a servicer sees such calls. Here:

- ``max_connections`` (gRPC's ``grpc.max_allowed_incoming_connections``): a connection past it
  is closed as it is accepted. The client sees UNAVAILABLE; no status can name the limit, since
  no call was made.
- ``handshake_timeout_s`` (``grpc.server_handshake_timeout_ms``): from accept to the end of the
  TLS and HTTP/2 handshakes; later, the connection is closed.
- ``max_connection_idle_s`` (``grpc.max_connection_idle_ms``, 0 = never): a connection with no
  call for that long gets GOAWAY. Clients reconnect on their next call without an error.
- :class:`CallGuard`, the first server interceptor: every call is counted from its headers to
  its end, and a unary-request method is served as a stream-request one whose single message
  the guard reads itself, so it runs before the message arrives. A call past the limit is
  refused at once (RESOURCE_EXHAUSTED naming the limit and its flag); a request message that
  has not arrived ``request_timeout_s`` after the headers ends the call (DEADLINE_EXCEEDED,
  naming ``grpc_request_timeout_s``); a stream that ends without its message is
  INVALID_ARGUMENT; a message that does not parse is INVALID_ARGUMENT without a traceback in
  the log. A stream whose client takes no message for ``write_timeout_s`` (it stopped reading,
  and HTTP/2 flow control holds the stream) is ended: its handler is closed at once, freeing
  what it held (the worker's sequence and stream slot, the router's call to the worker), the
  call leaves the count and DEADLINE_EXCEEDED follows once the client reads again or its
  connection ends. Every call therefore ends with a status, and the count with it. Unary probes
  (health checks, KServe liveness / readiness) count too, but are admitted up to
  :data:`PROBE_HEADROOM` past the limit, so a full port still answers its probes.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from llmserve.grpc_handlers import behavior_of
from llmserve.limits import flag_of

log = logging.getLogger(__name__)

CALL_LIMIT = "max_concurrent_rpcs"
REQUEST_TIMEOUT = "grpc_request_timeout_s"
WRITE_TIMEOUT = "grpc_write_timeout_s"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Unary probes admitted past a full port, so that it still answers them.
PROBE_HEADROOM = 64


@dataclass(frozen=True)
class GrpcPortLimits:
    """How many connections a gRPC port holds and how long it waits on a silent one, on a
    call's request message and on a stream's reader (see the module docstring). Defaults are
    the router's public port; :data:`WORKER_PORT_LIMITS` the worker's."""

    max_connections: int = 4096
    handshake_timeout_s: float = 10.0
    max_connection_idle_s: float = 600.0
    request_timeout_s: float = 30.0
    write_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_grpc_connections must be at least 1, got {self.max_connections}")
        timeouts = (("grpc_handshake_timeout_s", self.handshake_timeout_s),
                    (REQUEST_TIMEOUT, self.request_timeout_s), (WRITE_TIMEOUT, self.write_timeout_s))
        for name, value in timeouts:
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if not (self.max_connection_idle_s >= 0 and math.isfinite(self.max_connection_idle_s)):
            raise ValueError(f"grpc_max_connection_idle_s must be >= 0 seconds (0: never), "
                             f"got {self.max_connection_idle_s}")

    def server_options(self) -> list[tuple[str, int]]:
        """The gRPC server arguments these limits are."""
        options = [("grpc.max_allowed_incoming_connections", self.max_connections),
                   ("grpc.server_handshake_timeout_ms", _ms(self.handshake_timeout_s))]
        if self.max_connection_idle_s > 0:
            options.append(("grpc.max_connection_idle_ms", _ms(self.max_connection_idle_s)))
        return options


# Routers keep their channels to a worker open on purpose and watch them with pings: a worker
# does not close idle connections, and expects a few routers, not thousands of clients.
WORKER_PORT_LIMITS = GrpcPortLimits(max_connections=1024, max_connection_idle_s=0.0)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def add_grpc_port_flags(parser: argparse.ArgumentParser, defaults: GrpcPortLimits) -> argparse._ArgumentGroup:
    """The flags of :class:`GrpcPortLimits`, in a group returned for the caller's own."""
    g = parser.add_argument_group("gRPC connections")
    g.add_argument("--max-grpc-connections", type=int, default=defaults.max_connections,
                   help="open connections to the gRPC port; a new one past this is closed at once")
    g.add_argument("--grpc-handshake-timeout-s", type=float, default=defaults.handshake_timeout_s,
                   help="seconds a new connection has to finish its TLS and HTTP/2 handshakes")
    g.add_argument("--grpc-max-connection-idle-s", type=float, default=defaults.max_connection_idle_s,
                   help="a connection with no call for this long is closed (GOAWAY; clients reconnect "
                        "on their next call); 0 = never")
    g.add_argument("--grpc-request-timeout-s", type=float, default=defaults.request_timeout_s,
                   help="seconds from a call's headers to the end of its request message; later, the "
                        "call ends DEADLINE_EXCEEDED")
    g.add_argument("--grpc-write-timeout-s", type=float, default=defaults.write_timeout_s,
                   help="longest wait for a client to take one message of a stream (it stopped reading); "
                        "longer, the call ends DEADLINE_EXCEEDED and what it held is freed")
    return g


def grpc_port_limits_from_args(args: argparse.Namespace) -> GrpcPortLimits:
    """The limits the flags of :func:`add_grpc_port_flags` describe (ValueError when out of range)."""
    return GrpcPortLimits(max_connections=args.max_grpc_connections,
                          handshake_timeout_s=args.grpc_handshake_timeout_s,
                          max_connection_idle_s=args.grpc_max_connection_idle_s,
                          request_timeout_s=args.grpc_request_timeout_s,
                          write_timeout_s=args.grpc_write_timeout_s)


def is_health_check(method: str) -> bool:
    """The unary probe every gRPC server here answers (``grpc.health.v1.Health/Check``)."""
    return method == HEALTH_CHECK


class CallGuard(grpc.aio.ServerInterceptor):
    """Counts every call from its headers to its end, refuses one past ``limit`` at once, reads
    the request message of unary-request methods itself within ``timeouts.request_timeout_s``
    and writes streams' messages itself within ``timeouts.write_timeout_s`` each (see the module
    docstring); a refusal past the limit names ``max_concurrent_rpcs`` and its flag.
    ``on_refusal(limit)`` counts each refusal (``max_concurrent_rpcs``, ``grpc_request_timeout_s``
    or ``grpc_write_timeout_s``);
    ``is_probe(method)``: unary probes, admitted up to :data:`PROBE_HEADROOM` past the limit.
    Install it first: it sees every call and a refused call costs nothing further."""

    def __init__(self, limit: int, timeouts: GrpcPortLimits, on_refusal: Callable[[str], None], *,
                 is_probe: Callable[[str], bool] = is_health_check) -> None:
        if limit < 1:
            raise ValueError(f"{CALL_LIMIT} must be at least 1, got {limit}")
        self.limit = limit
        self.request_timeout_s = timeouts.request_timeout_s
        self.write_timeout_s = timeouts.write_timeout_s
        self._on_refusal = on_refusal
        self._is_probe = is_probe
        self._in_flight = 0
        self._full = (f"too many calls in flight: the limit is {limit} ({CALL_LIMIT}, flag "
                      f"{flag_of(CALL_LIMIT)}); retry later")
        self._late = (f"the request message did not arrive within {self.request_timeout_s:g} s of the call's "
                      f"start ({REQUEST_TIMEOUT}, flag {flag_of(REQUEST_TIMEOUT)})")
        self._stalled = (f"the client took no message of the stream for {self.write_timeout_s:g} s "
                         f"({WRITE_TIMEOUT}, flag {flag_of(WRITE_TIMEOUT)})")

    @property
    def in_flight(self) -> int:
        """Calls counted now."""
        return self._in_flight

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # UNIMPLEMENTED, answered by grpc at once
        unary_request = not handler.request_streaming
        probe = unary_request and not handler.response_streaming and self._is_probe(details.method)
        bound = self.limit + (PROBE_HEADROOM if probe else 0)
        if self._in_flight >= bound:
            self._on_refusal(CALL_LIMIT)
            return _refusing_at_once(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, self._full)
        # grpc.aio runs each call in a task of its own, interceptors included, which now ends with
        # the call whatever happens: the handler below always answers, also when the message
        # never comes. Counting to that task's end is therefore exact.
        task = asyncio.current_task()
        slot = _Slot(self, held=task is not None)
        if task is not None:
            self._in_flight += 1
            task.add_done_callback(slot.release)
        if unary_request:
            return self._reading_request(handler, slot)
        behavior = behavior_of(handler)
        if handler.response_streaming and inspect.isasyncgenfunction(behavior):
            async def streams(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
                await self._write_all(behavior(requests, context), context, slot)

            return grpc.stream_stream_rpc_method_handler(
                streams, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    async def _write_all(self, messages: AsyncGenerator[Any, None], context: grpc.aio.ServicerContext,
                         slot: _Slot) -> None:
        """Write what a stream handler yields, each message within ``write_timeout_s``; past it
        the handler is closed at once (what it holds is freed) and the call ended."""
        loop = asyncio.get_running_loop()
        stall = _Stall(self, messages, slot)
        try:
            async for message in messages:
                timer = loop.call_later(self.write_timeout_s, stall.fire)
                try:
                    await context.write(message)
                except Exception:
                    if stall.fired or context.cancelled() or context.done():
                        return  # the call ended under the write (the client left): nobody to tell
                    raise
                finally:
                    timer.cancel()
                if stall.fired:
                    break
        finally:
            await stall.close_handler()
        if stall.fired:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self._stalled)

    def _reading_request(self, handler: grpc.RpcMethodHandler, slot: _Slot) -> grpc.RpcMethodHandler:
        """``handler`` served as its stream-request twin that reads the one message itself (and
        writes a stream's messages itself, see :meth:`_write_all`)."""
        behavior = behavior_of(handler)
        serializer = handler.response_serializer
        read = _RequestReader(handler.request_deserializer, self.request_timeout_s, self._late,
                              lambda: self._on_refusal(REQUEST_TIMEOUT))
        if handler.unary_unary is not None:
            async def unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                return await behavior(await read(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(unary, response_serializer=serializer)
        if inspect.isasyncgenfunction(behavior):
            async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
                request = await read(requests, context)
                await self._write_all(behavior(request, context), context, slot)

            return grpc.stream_stream_rpc_method_handler(stream, response_serializer=serializer)

        async def writing(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await read(requests, context), context)  # writes with context.write

        return grpc.stream_stream_rpc_method_handler(writing, response_serializer=serializer)


_NO_MESSAGE = "the call ended without its request message"


class _Slot:
    """One call's place in a :class:`CallGuard`'s count, given back once: when the call's task
    ends, or earlier when its stream is ended for a client that stopped reading."""

    __slots__ = ("_guard", "_held")

    def __init__(self, guard: CallGuard, held: bool) -> None:
        self._guard = guard
        self._held = held

    def release(self, *_: object) -> None:
        if self._held:
            self._held = False
            self._guard._in_flight -= 1


class _Stall:
    """What happens when a stream's client has taken no message for the write timeout: HTTP/2
    flow control holds the write, and grpc.aio can send nothing after it (not even a status)
    until the client reads or its connection ends. The handler and the count need not wait:
    the handler is closed now (freeing what it holds: the worker's sequence and stream slot, the
    router's call to a worker) and the call leaves the count; the status follows the write."""

    __slots__ = ("_guard", "_messages", "_slot", "fired", "_closing")

    def __init__(self, guard: CallGuard, messages: AsyncGenerator[Any, None], slot: _Slot) -> None:
        self._guard = guard
        self._messages = messages
        self._slot = slot
        self.fired = False
        self._closing: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly

    def fire(self) -> None:
        self.fired = True
        self._slot.release()
        self._guard._on_refusal(WRITE_TIMEOUT)
        log.info("a stream's client took no message for %g s: ended", self._guard.write_timeout_s)
        # The handler is suspended at its yield (its message is the one being written), so it
        # can be closed from here.
        self._closing = asyncio.ensure_future(self._messages.aclose())

    async def close_handler(self) -> None:
        """Close the handler once: wait for the close :meth:`fire` started (a handler's cleanup
        can outlast the held write: a second ``aclose`` meanwhile would fail the call with
        "asynchronous generator is already running"), else close it now."""
        if self._closing is None:
            await self._messages.aclose()
        else:
            await self._closing


class _RequestReader:
    """The one request message of a unary-request call, read from its raw stream: the message,
    or the call ended with a status naming why there is none."""

    def __init__(self, deserializer: Callable[[bytes], Any] | None, timeout_s: float, late: str,
                 on_late: Callable[[], None]) -> None:
        self._deserializer = deserializer
        self._timeout_s = timeout_s
        self._late = late
        self._on_late = on_late

    async def __call__(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                raw = await anext(aiter(requests), None)
        except TimeoutError:
            self._on_late()
            await _end(context, grpc.StatusCode.DEADLINE_EXCEEDED, self._late)
        if raw is None:
            await _end(context, grpc.StatusCode.INVALID_ARGUMENT, _NO_MESSAGE)
        if self._deserializer is None:
            return raw
        try:
            return self._deserializer(raw)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and kin: the client's bytes
            log.debug("a request message that does not parse (%d bytes)", len(raw))
            await _end(context, grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse")


async def _end(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("abort() raises")  # pragma: no cover


def _refusing_at_once(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
                      ) -> grpc.RpcMethodHandler:
    """A refusal that answers at the call's start, without waiting for a request message: a
    stream-request handler of the same response kind."""
    async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
