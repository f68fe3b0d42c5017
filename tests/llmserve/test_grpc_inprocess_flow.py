"""Flow control of ``llmserve.grpc_inprocess`` streams: a handler runs at most one unread
message ahead of its caller (the twin of HTTP/2 flow control), for both ways a handler
streams (an async generator and ``context.write``); a caller that cancels or whose deadline
passes while the handler waits still ends the handler: the cancellation reaches it where it
waits (an ``except CancelledError`` there runs, as when cancelled inside it), then its ``finally``."""

from __future__ import annotations

import asyncio
import logging
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
    # A writer gets it in its write; a generator is resumed, and as it yields again without
    # waiting, the cancellation reaches it at that yield: one message more made, none sent.
    assert counter.produced == (2 if style == "generator" else 1) and counter.saw_cancel
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_a_deadline_ends_a_handler_waiting_for_its_reader() -> None:
    counter = Counter(total=50)
    call = _channel(counter, "generator").unary_stream(METHOD)(b"", timeout=0.05)
    await asyncio.wait_for(counter.closed.wait(), 5.0)
    assert counter.produced == 2 and counter.saw_cancel
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


class Waiter:
    """A handler like the worker's Generate: one message, then a wait for more that never come
    (the engine's output); records where the cancellation reached it and in which task."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.ended_by = ""  # the exception that ended it: CancelledError, GeneratorExit
        self.tasks: list[asyncio.Task[object] | None] = []

    async def generator(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.tasks.append(asyncio.current_task())
        try:
            yield b"first"
            await asyncio.Event().wait()
        except BaseException as exc:
            self.ended_by = type(exc).__name__
            raise
        finally:
            self.tasks.append(asyncio.current_task())
            self.closed.set()


@pytest.mark.parametrize("end", ["deadline", "cancel"])
async def test_a_cancellation_in_send_reaches_the_bottom_of_a_traced_interceptor_chain(
    end: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's chain: OpenTelemetry's server interceptor (which iterates the next handler
    with ``async for``, passing nothing thrown at its yield on) around our error interceptor.
    The call ends while the handler waits for its reader: the cancellation must still reach the
    servicer where it waits, in the handler's own task, through both interceptors (the error
    interceptor's log line says why; no context detached in a foreign task)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gpu_worker.server.interceptor import ErrorInterceptor
    from llmserve.telemetry import setup_tracing

    caplog.set_level(logging.INFO)
    exporter = InMemorySpanExporter()
    tracing = setup_tracing("flow-test", span_exporter=exporter)
    waiter = Waiter()
    server = InProcessServer([*tracing.server_interceptors(), ErrorInterceptor()])
    handler = grpc.unary_stream_rpc_method_handler(waiter.generator)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Flow", {"Count": handler})])
    call = InProcessChannel(server).unary_stream(METHOD)(b"", timeout=0.1 if end == "deadline" else 60)
    await _settle()  # the handler sent its first message and waits for the reader
    if end == "cancel":
        assert call.cancel()
    await asyncio.wait_for(server.stop(grace=5.0), 10.0)  # its task ended
    assert waiter.closed.is_set() and waiter.ended_by == "CancelledError"
    assert len(waiter.tasks) == 2 and waiter.tasks[0] is waiter.tasks[1]  # closed in its own task
    reason = "deadline exceeded" if end == "deadline" else "cancelled by the client"
    assert f"{METHOD} {reason}" in caplog.messages
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]
    assert [span.name for span in exporter.get_finished_spans()] == [METHOD]
    tracing.shutdown()
