"""A gRPC port's limits (``llmserve.grpc_limits``) on a real grpc.aio server bound the way the
router and the worker bind theirs (``bind_server`` and the ``CallGuard`` interceptor first),
driven by raw sockets and the official client as a hostile or careless client would: a
connection that never handshakes or never calls is closed, connections past the limit are
turned away and the port recovers when they go; a call past the limit is refused at once
naming it, even before its request message; a request message that never comes, a stream
ended without one and one that does not parse each end the call with a status; probes still
pass a full port, within a bound; and no call stays counted after it ended, however it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.grpc_limits import PROBE_HEADROOM, CallGuard, GrpcPortLimits
from llmserve.grpc_server import bind_server
from tests.helpers.stalled_clients import (
    closed_by_server,
    half_open,
    silent_connection,
    silent_connection_closed,
)

pytestmark = pytest.mark.asyncio
STREAM = "/t.Echo/Stream"
UNARY = "/t.Echo/Unary"
PARSED = "/t.Echo/Parsed"
CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield request


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"fail":
        raise RuntimeError("handler failed")
    return request


BIG_MESSAGES = 64


def _big(close_s: float = 0.0) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]]:
    """A handler of 64 messages of 1 MiB, more than HTTP/2 flow control lets through to a client
    not reading; its cleanup takes ``close_s`` (a KServe stream's waits for its requests'
    tasks), then ``CLOSED`` records when it ended (its ``finally``)."""
    async def big(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            for _ in range(BIG_MESSAGES):
                yield b"x" * (1 << 20)
        finally:
            if close_s:
                await asyncio.sleep(close_s)
            CLOSED.append(asyncio.get_running_loop().time())

    return big


CLOSED: list[float] = []
SLOW_CLOSE_S = 2.0


async def _parsed(request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> bytes:
    return request.service.encode()


class Port:
    """A started server with the echo service and health behind a :class:`CallGuard`, and the
    refusals the guard counted."""

    def __init__(self, server: grpc.aio.Server, port: int, guard: CallGuard, refusals: list[str]) -> None:
        self.server, self.port, self.guard, self.refusals = server, port, guard, refusals

    def in_flight(self) -> int:
        return self.guard.in_flight

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(limits: GrpcPortLimits = GrpcPortLimits(), max_calls: int = 1000) -> AsyncIterator[Port]:
    refusals: list[str] = []
    guard = CallGuard(max_calls, limits, refusals.append)
    server, port = bind_server("127.0.0.1", 0, [guard], [], port_limits=limits)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", {
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Big": grpc.unary_stream_rpc_method_handler(_big()),
        "BigSlowClose": grpc.unary_stream_rpc_method_handler(_big(SLOW_CLOSE_S)),
        "Parsed": grpc.unary_unary_rpc_method_handler(
            _parsed, request_deserializer=health_pb2.HealthCheckRequest.FromString),
    }),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await server.start()
    try:
        yield Port(server, port, guard, refusals)
    finally:
        await server.stop(0)


async def wait_for(predicate: Any, what: str, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():
            await asyncio.sleep(0.02)
    assert predicate(), what


async def ending(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with (a stream's, or a unary call's), OK included."""
    try:
        if isinstance(call, grpc.aio.UnaryUnaryCall):
            await call
        else:
            async for _ in call:
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def ended_at_once(call: Any, within_s: float = 3.0) -> tuple[grpc.StatusCode, str]:
    async with asyncio.timeout(within_s):
        return await ending(call)


def ended_without_message(channel: grpc.aio.Channel, method: str) -> Any:
    """A call of a unary-request method whose stream ends without a request message (the
    official client sends this for a stream-request call with no message)."""
    return channel.stream_stream(method)(iter(()))


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
        held = [await silent_connection(port.port, H2_PREFACE) for _ in range(2)]
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


async def test_calls_past_the_limit_are_refused_at_once_naming_it() -> None:
    async with serving(max_calls=2) as port, grpc.aio.insecure_channel(port.target) as channel:
        held = [half_open(channel, STREAM) for _ in range(2)]  # counted from their headers
        await wait_for(lambda: port.in_flight() == 2, "two calls in flight")
        # refused before any message: a half-open call, a unary one and a stream
        for call in (half_open(channel, UNARY), channel.unary_unary(UNARY)(b"u"),
                     channel.unary_stream(STREAM)(b"s")):
            code, details = await ended_at_once(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit is 2 (max_concurrent_rpcs, flag --max-concurrent-rpcs)" in details
        assert port.refusals == ["max_concurrent_rpcs"] * 3
        for call in held:
            call.cancel()
        await wait_for(lambda: port.in_flight() == 0, "cancelled calls released")
        assert await channel.unary_unary(UNARY)(b"again") == b"again"


async def test_a_stream_ended_without_its_request_is_answered_and_released() -> None:
    """grpc.aio alone never answers such a call: it stays open as long as its connection."""
    async with serving(max_calls=4) as port, grpc.aio.insecure_channel(port.target) as channel:
        for method in (UNARY, STREAM, PARSED, CHECK, WATCH):
            code, details = await ended_at_once(ended_without_message(channel, method))
            assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                                       "the call ended without its request message"), method
        await wait_for(lambda: port.in_flight() == 0, "released")
        assert port.refusals == []


async def test_a_request_that_never_arrives_ends_its_call_after_the_timeout() -> None:
    async with serving(GrpcPortLimits(request_timeout_s=0.5), max_calls=4) as port, \
            grpc.aio.insecure_channel(port.target) as channel:
        calls = [half_open(channel, method) for method in (UNARY, STREAM, CHECK)]
        for call in calls:
            code, details = await ended_at_once(call, within_s=10)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "within 0.5 s of the call's start (grpc_request_timeout_s, flag " \
                   "--grpc-request-timeout-s)" in details
        assert port.refusals == ["grpc_request_timeout_s"] * 3
        await wait_for(lambda: port.in_flight() == 0, "released")
        assert await channel.unary_unary(UNARY)(b"on time") == b"on time"


async def test_a_message_that_does_not_parse_is_refused_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    async with serving() as port, grpc.aio.insecure_channel(port.target) as channel:
        with caplog.at_level(logging.INFO):
            code, details = await ending(channel.unary_unary(PARSED)(b"\xff\xff\xff not protobuf"))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
        good = health_pb2.HealthCheckRequest(service="svc").SerializeToString()
        assert await channel.unary_unary(PARSED)(good) == b"svc"


async def test_probes_pass_a_full_port_within_their_headroom() -> None:
    async with serving(max_calls=2) as port, grpc.aio.insecure_channel(port.target) as channel:
        held = [half_open(channel, STREAM) for _ in range(2)]
        await wait_for(lambda: port.in_flight() == 2, "the port full")
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # a Watch stream is no probe: it waits its turn like any call
        code, _ = await ended_at_once(channel.unary_stream(WATCH)(health_pb2.HealthCheckRequest()
                                                                   .SerializeToString()))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # probes themselves are bounded: stalled ones fill the headroom, then they are refused too
        probes = [half_open(channel, CHECK) for _ in range(PROBE_HEADROOM)]
        await wait_for(lambda: port.in_flight() == 2 + PROBE_HEADROOM, "the headroom full")
        code, details = await ended_at_once(half_open(channel, CHECK))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_rpcs" in details
        for call in [*held, *probes]:
            call.cancel()
        await wait_for(lambda: port.in_flight() == 0, "released")


async def test_every_ending_releases_its_call() -> None:
    """Completed, failed, cancelled before and after the request, and unknown-method calls all
    leave the count, one after another past the limit."""
    async with serving(max_calls=4) as port, grpc.aio.insecure_channel(port.target) as channel:
        for _ in range(10):
            assert await channel.unary_unary(UNARY)(b"ok") == b"ok"
            assert (await ending(channel.unary_unary(UNARY)(b"fail")))[0] == grpc.StatusCode.UNKNOWN
            assert [m async for m in channel.unary_stream(STREAM)(b"s")] == [b"s"]
            call = half_open(channel, STREAM)
            await wait_for(lambda: port.in_flight() == 1, "the half-open call counted")
            call.cancel()
            await wait_for(lambda: port.in_flight() == 0, "released")
        code, _ = await ending(channel.unary_unary("/t.Echo/Missing")(b"x"))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        await wait_for(lambda: port.in_flight() == 0, "an unknown method released")
        assert port.refusals == []


async def test_a_stream_whose_client_stopped_reading_is_ended_and_its_handler_closed() -> None:
    CLOSED.clear()
    async with serving(GrpcPortLimits(write_timeout_s=0.5)) as port, \
            grpc.aio.insecure_channel(port.target) as channel:
        call = channel.unary_stream("/t.Echo/Big")(b"")
        # the client reads nothing: once flow control holds the stream, the handler is closed
        # (what it held freed) and the call leaves the count, without waiting for the client
        await wait_for(lambda: CLOSED and port.in_flight() == 0, "the stalled stream ended", within_s=15)
        assert port.refusals == ["grpc_write_timeout_s"]
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:  # what was in flight, then the status
                received += 1
        assert 0 < received < BIG_MESSAGES
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "(grpc_write_timeout_s, flag --grpc-write-timeout-s)" in (info.value.details() or "")


async def test_a_stalled_stream_whose_handler_closes_slowly_ends_with_its_status(
        caplog: pytest.LogCaptureFixture) -> None:
    """The client reads again while the handler's cleanup still runs: the call waits for that
    cleanup (it is not closed a second time, which failed the call UNKNOWN with "asynchronous
    generator is already running" and an ERROR), then ends DEADLINE_EXCEEDED."""
    CLOSED.clear()
    async with serving(GrpcPortLimits(write_timeout_s=0.5)) as port, \
            grpc.aio.insecure_channel(port.target) as channel:
        with caplog.at_level(logging.INFO):
            call = channel.unary_stream("/t.Echo/BigSlowClose")(b"")
            await wait_for(lambda: port.in_flight() == 1, "the stream began")
            await wait_for(lambda: port.in_flight() == 0, "the stalled stream left the count", within_s=15)
            assert not CLOSED  # its cleanup is still running
            code, details = await ending(call)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert "(grpc_write_timeout_s, flag --grpc-write-timeout-s)" in details
        assert CLOSED  # the status came once the cleanup was done
        assert port.refusals == ["grpc_write_timeout_s"]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
            [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_slow_but_steady_reader_gets_its_whole_stream() -> None:
    CLOSED.clear()
    async with serving(GrpcPortLimits(write_timeout_s=1.0)) as port, \
            grpc.aio.insecure_channel(port.target) as channel:
        received = 0
        async for _ in channel.unary_stream("/t.Echo/Big")(b""):
            received += 1
            await asyncio.sleep(0.02)  # slower than the server writes, never 1 s behind
        assert received == BIG_MESSAGES
        assert port.refusals == []


async def test_a_stalled_stream_whose_client_then_leaves_ends_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    """The write held by flow control fails when the client goes: the call is over, not an error."""
    CLOSED.clear()
    async with serving(GrpcPortLimits(write_timeout_s=0.5)) as port:
        with caplog.at_level(logging.INFO):
            channel = grpc.aio.insecure_channel(port.target)
            call = channel.unary_stream("/t.Echo/Big")(b"")
            await wait_for(lambda: CLOSED and port.in_flight() == 0, "the stalled stream ended", within_s=15)
            call.cancel()
            await channel.close()
            await asyncio.sleep(0.5)  # the held write fails now
        assert port.refusals == ["grpc_write_timeout_s"]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
            [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        async with grpc.aio.insecure_channel(port.target) as fresh:
            assert await fresh.unary_unary(UNARY)(b"next") == b"next"
