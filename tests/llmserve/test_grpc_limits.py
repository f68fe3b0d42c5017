"""A gRPC port's limits (``llmserve.grpc_limits``) on a real grpc.aio server bound the way the
router and the worker bind theirs (``bind_server``), driven by raw sockets and the official
client as a hostile or careless client would: a connection that never handshakes or never
calls is closed, connections past the limit are turned away and the port recovers when they
go, calls past the limit are refused naming it (or, when they never send their message, by
gRPC's own limiter), and no refused or abandoned call stays counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.grpc_limits import CallLimitInterceptor, GrpcPortLimits, core_call_limit
from llmserve.grpc_server import bind_server
from tests.helpers.stalled_clients import closed_by_server, half_open, silent_connection_closed

pytestmark = pytest.mark.asyncio
STREAM = "/t.Echo/Stream"
UNARY = "/t.Echo/Unary"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield request


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"fail":
        raise RuntimeError("handler failed")
    return request


class Port:
    """A started server with the echo service and health, its call limit and refusal count."""

    def __init__(self, server: grpc.aio.Server, port: int, limit: CallLimitInterceptor | None,
                 refusals: list[str]) -> None:
        self.server, self.port, self.limit, self.refusals = server, port, limit, refusals

    def in_flight(self) -> int:
        """Calls the interceptor counts now."""
        assert self.limit is not None
        return self.limit.in_flight

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def half_open(self, channel: grpc.aio.Channel) -> Any:
        return half_open(channel, STREAM)

    async def open_socket(self, first: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        if first:
            writer.write(first)
            await writer.drain()
        return reader, writer


@contextlib.asynccontextmanager
async def serving(limits: GrpcPortLimits | None = None, max_calls: int | None = None) -> AsyncIterator[Port]:
    refusals: list[str] = []
    limit = CallLimitInterceptor(max_calls, refusals.append) if max_calls is not None else None
    server, port = bind_server("127.0.0.1", 0, [limit] if limit else [], [], port_limits=limits,
                               max_calls=max_calls)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", {
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    }),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await server.start()
    try:
        yield Port(server, port, limit, refusals)
    finally:
        await server.stop(0)


async def wait_for(predicate: Any, what: str, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():
            await asyncio.sleep(0.02)
    assert predicate(), what


async def refusal_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status a refused call ends with (a stream's, or a unary call's)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if isinstance(call, grpc.aio.UnaryUnaryCall):
            await call
        else:
            async for _ in call:
                pass
    return info.value.code(), info.value.details() or ""


async def test_a_connection_that_never_handshakes_is_closed() -> None:
    async with serving(GrpcPortLimits(handshake_timeout_s=0.3)) as port:
        # TCP only, no HTTP/2 preface: held for 120 s by default
        assert await silent_connection_closed(port.port)


async def test_an_idle_connection_is_closed_and_clients_reconnect_transparently() -> None:
    async with serving(GrpcPortLimits(max_connection_idle_s=0.3)) as port:
        # a valid HTTP/2 client making no call: by default held for ever
        assert await silent_connection_closed(port.port, H2_PREFACE)
        async with grpc.aio.insecure_channel(port.target) as channel:
            assert await channel.unary_unary(UNARY)(b"a") == b"a"
            await asyncio.sleep(1.0)  # GOAWAY to the idle channel's connection
            assert await channel.unary_unary(UNARY)(b"b") == b"b"  # reconnected, no error seen


async def test_connections_past_the_limit_are_turned_away_until_others_close() -> None:
    async with serving(GrpcPortLimits(max_connections=2, handshake_timeout_s=30)) as port:
        held = [await port.open_socket(H2_PREFACE) for _ in range(2)]
        await asyncio.sleep(0.2)
        async with grpc.aio.insecure_channel(port.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(UNARY)(b"x", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # the held connections are not disturbed by the refusal
        assert not await closed_by_server(held[0][0], within_s=0.3)
        for _, writer in held:
            writer.close()

        async def call_once() -> bool:
            async with grpc.aio.insecure_channel(port.target) as fresh:
                try:
                    return await fresh.unary_unary(UNARY)(b"y", timeout=2) == b"y"
                except grpc.aio.AioRpcError:
                    return False

        async with asyncio.timeout(15):
            while not await call_once():
                await asyncio.sleep(0.1)


async def test_calls_past_the_limit_are_refused_naming_it_and_probes_still_answer() -> None:
    async with serving(max_calls=2) as port, grpc.aio.insecure_channel(port.target) as channel:
        held = [port.half_open(channel) for _ in range(2)]  # counted from their headers
        await wait_for(lambda: port.in_flight() == 2, "two calls in flight")
        for call in (channel.unary_stream(STREAM)(b"s"), channel.unary_unary(UNARY)(b"u")):
            code, details = await refusal_of(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit is 2 (max_concurrent_rpcs, flag --max-concurrent-rpcs)" in details
        assert port.refusals == ["max_concurrent_rpcs"] * 2
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # probes are not counted
        for call in held:
            call.cancel()
        await wait_for(lambda: port.in_flight() == 0, "cancelled calls released")
        assert await channel.unary_unary(UNARY)(b"again") == b"again"
        assert port.in_flight() == 0


async def test_every_ending_releases_its_call() -> None:
    """Completed, failed, refused-by-the-handler and cancelled-mid-stream calls all leave the count."""
    async with serving(max_calls=4) as port, grpc.aio.insecure_channel(port.target) as channel:
        for _ in range(10):  # more than the limit, one after another
            assert await channel.unary_unary(UNARY)(b"ok") == b"ok"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(UNARY)(b"fail")
            assert info.value.code() == grpc.StatusCode.UNKNOWN
            assert [m async for m in channel.unary_stream(STREAM)(b"s")] == [b"s"]
            call = port.half_open(channel)
            await wait_for(lambda: port.in_flight() == 1, "the half-open call counted")
            call.cancel()
            await wait_for(lambda: port.in_flight() == 0, "released")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await channel.unary_unary("/t.Echo/Missing")(b"x")
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await wait_for(lambda: port.in_flight() == 0, "an unknown method released")
        assert port.refusals == []


async def test_a_flood_of_calls_that_never_send_their_message_is_bounded_by_grpc() -> None:
    """Past the interceptor's limit a call is refused only once its message arrives; gRPC's own
    limiter, a little higher, refuses the rest at once, and everything is released after."""
    async with serving(max_calls=2) as port, grpc.aio.insecure_channel(port.target) as channel:
        core = core_call_limit(2)
        calls = [port.half_open(channel) for _ in range(core + 6)]
        outcomes = await asyncio.wait([asyncio.create_task(refusal_of(c)) for c in calls], timeout=3)
        refused_at_once = [t.result() for t in outcomes[0]]
        assert len(refused_at_once) == 6, refused_at_once
        assert {code for code, _ in refused_at_once} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert port.in_flight() == 2  # the interceptor counted only what it admitted
        for call in calls:
            call.cancel()
        await asyncio.wait(outcomes[1], timeout=5)
        await wait_for(lambda: port.in_flight() == 0, "flood released")
        assert [m async for m in channel.unary_stream(STREAM)(b"after")] == [b"after"]
