"""Limits of a gRPC port on its connections and calls, shared by the router and the worker.
Torch-free: the router imports it.

gRPC's defaults leave a port open to cheap abuse: a TCP connection that never completes its
HTTP/2 handshake is held for 120 s, one that makes no call is held forever, connections are not
counted, and a call whose request message never arrives (headers sent, body held back) waits
without end and never reaches a handler, so no limit of the servicer sees it. Here:

- ``max_connections`` (gRPC's ``grpc.max_allowed_incoming_connections``): a connection past it
  is closed as it is accepted. The client sees UNAVAILABLE; no status can name the limit, since
  no call was made.
- ``handshake_timeout_s`` (``grpc.server_handshake_timeout_ms``): from accept to the end of the
  TLS and HTTP/2 handshakes; later, the connection is closed.
- ``max_connection_idle_s`` (``grpc.max_connection_idle_ms``, 0 = never): a connection with no
  call for that long gets GOAWAY. Clients reconnect on their next call without an error.
- :class:`CallLimitInterceptor`: calls in flight (health probes aside), counted from their
  headers, so calls whose message has not arrived count too. A call past the limit is answered
  RESOURCE_EXHAUSTED naming the limit and its flag, and counted by ``on_refusal``. That answer
  can only be sent once the call's message has arrived, so gRPC's own limiter
  (``maximum_concurrent_rpcs`` of the server, :func:`core_call_limit`) stands behind it a little
  higher: it answers at once ("Concurrent RPC limit exceeded!") and bounds a flood of calls that
  never send their message.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from llmserve.grpc_handlers import refusing
from llmserve.limits import flag_of

log = logging.getLogger(__name__)

CALL_LIMIT = "max_concurrent_rpcs"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class GrpcPortLimits:
    """How many connections a gRPC port holds and how long it waits on a silent one (see the
    module docstring). Defaults are the router's public port; :data:`WORKER_PORT_LIMITS`
    the worker's."""

    max_connections: int = 4096
    handshake_timeout_s: float = 10.0
    max_connection_idle_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_grpc_connections must be at least 1, got {self.max_connections}")
        if not (self.handshake_timeout_s > 0 and math.isfinite(self.handshake_timeout_s)):
            raise ValueError(f"grpc_handshake_timeout_s must be a positive number of seconds, "
                             f"got {self.handshake_timeout_s}")
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


def core_call_limit(calls: int) -> int:
    """gRPC's own limit on calls in flight behind a limit of ``calls`` enforced above it (the
    interceptor, or the worker's ``max_concurrent_streams``): room for the calls that limit
    refuses while their messages arrive, and for health probes."""
    return calls + max(64, calls // 8)


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
    return g


def grpc_port_limits_from_args(args: argparse.Namespace) -> GrpcPortLimits:
    """The limits the flags of :func:`add_grpc_port_flags` describe (ValueError when out of range)."""
    return GrpcPortLimits(max_connections=args.max_grpc_connections,
                          handshake_timeout_s=args.grpc_handshake_timeout_s,
                          max_connection_idle_s=args.grpc_max_connection_idle_s)


class CallLimitInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call past ``limit`` calls in flight with RESOURCE_EXHAUSTED naming
    ``max_concurrent_rpcs`` and its flag; ``on_refusal(limit)`` counts each refusal. Calls of
    ``exempt(method)`` (health probes) are neither counted nor refused. Install it first, so a
    refused call costs nothing further."""

    def __init__(self, limit: int, on_refusal: Callable[[str], None],
                 exempt: Callable[[str], bool] = lambda method: method.startswith(HEALTH_PREFIX)) -> None:
        if limit < 1:
            raise ValueError(f"{CALL_LIMIT} must be at least 1, got {limit}")
        self.limit = limit
        self._on_refusal = on_refusal
        self._exempt = exempt
        self._in_flight = 0
        self._message = (f"too many calls in flight: the limit is {limit} ({CALL_LIMIT}, flag "
                         f"{flag_of(CALL_LIMIT)}); retry later")

    @property
    def in_flight(self) -> int:
        """Calls counted now."""
        return self._in_flight

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self._exempt(details.method):
            return await continuation(details)
        if self._in_flight >= self.limit:
            handler = await continuation(details)
            if handler is None:
                return handler
            self._on_refusal(CALL_LIMIT)
            return refusing(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, self._message)
        # grpc.aio runs each call in a task of its own, interceptors included, which ends when
        # the call does: also when the client leaves before its message arrived and no handler
        # ever runs. Counting to that task's end is therefore exact, whatever the handler does.
        task = asyncio.current_task()
        if task is None:  # not under grpc.aio: nothing to count against
            return await continuation(details)
        self._in_flight += 1
        task.add_done_callback(self._release)
        return await continuation(details)

    def _release(self, _task: asyncio.Task[object]) -> None:
        self._in_flight -= 1
