"""Flow control of ``llmserve.grpc_inprocess`` streams: a handler runs at most one unread
message ahead of its caller (the twin of HTTP/2 flow control), for both ways a handler
streams (an async generator and ``context.write``); a caller that cancels or whose deadline
passes while the handler waits still ends the handler: the cancellation reaches it where it
waits (an ``except CancelledError`` there runs, as when cancelled inside it), then its ``finally``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from llmserve.grpc_inprocess import InProcessChannel, InProcessServer

METHOD = "/test.Flow/Count"


class Counter:
    """A stream of ``b"0"``, ``b"1"``, ... that records how far it got and whether it ended."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.produced = 0
        self.closed = asyncio.Event()
        self.saw_cancel = False  # the cancellation reached the handler (where it waited)

    async def generator(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            for i in range(self.total):
                self.produced += 1
                yield str(i).encode()
        except asyncio.CancelledError:
            self.saw_cancel = True
            raise
        finally:
            self.closed.set()

    async def writer(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        try:
            for i in range(self.total):
                self.produced += 1
                await context.write(str(i).encode())
        except asyncio.CancelledError:
            self.saw_cancel = True
            raise
        finally:
            self.closed.set()


def _channel(counter: Counter, style: str) -> InProcessChannel:
    server = InProcessServer()
    behavior = counter.generator if style == "generator" else counter.writer
    handler = grpc.unary_stream_rpc_method_handler(behavior)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Flow", {"Count": handler})])
    return InProcessChannel(server)


async def _settle() -> None:
    for _ in range(20):  # enough loop turns for an unthrottled handler to run far ahead
        await asyncio.sleep(0)


@pytest.mark.parametrize("style", ["generator", "write"])
async def test_the_handler_runs_one_message_ahead_of_its_reader(style: str) -> None:
    counter = Counter(total=50)
    call = _channel(counter, style).unary_stream(METHOD)(b"")
    await _settle()
    assert counter.produced == 1  # one message waits unread: the handler waits with it
    got = []
    for n in range(1, 6):
        got.append(await call.read())
        await _settle()
        assert counter.produced == n + 1
    got += [m async for m in call]
    assert got == [str(i).encode() for i in range(50)]
    assert await call.code() == grpc.StatusCode.OK and counter.closed.is_set()


@pytest.mark.parametrize("style", ["generator", "write"])
async def test_cancel_ends_a_handler_waiting_for_its_reader(style: str) -> None:
    counter = Counter(total=50)
    call = _channel(counter, style).unary_stream(METHOD)(b"")
    await _settle()
    assert call.cancel()
    await asyncio.wait_for(counter.closed.wait(), 5.0)
    assert counter.produced == 1 and counter.saw_cancel
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_a_deadline_ends_a_handler_waiting_for_its_reader() -> None:
    counter = Counter(total=50)
    call = _channel(counter, "generator").unary_stream(METHOD)(b"", timeout=0.05)
    await asyncio.wait_for(counter.closed.wait(), 5.0)
    assert counter.produced == 1 and counter.saw_cancel
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
