"""One in-process call (``llmserve.grpc_inprocess``): its shared state, the servicer context
the handler sees and the call object the caller holds, with ``grpc.aio``'s semantics for the
status (set once), the deadline, cancellation and the end of a stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, NamedTuple

import grpc

LOCAL_PEER = "unix:in-process"
"""``context.peer()`` of an in-process call: a caller on this host (``peer_is_loopback``)."""

_EOF = object()
Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]


class Metadatum(NamedTuple):
    """One entry of ``invocation_metadata()``, as grpc's own (``.key``, ``.value``)."""

    key: str
    value: str | bytes


class Rpc:
    """One call's shared state: the handler's messages, the status (set once), the deadline."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.deadline: float | None = None
        self.context = ServicerContext(self)
        self.locally_cancelled = False
        self.status: Status | None = None
        self._messages: asyncio.Queue[Any] = asyncio.Queue()
        # Set while no message waits unread (or the call ended): a streaming handler's flow control.
        self._drained = asyncio.Event()
        self._drained.set()
        self._ended_early = False  # cancelled, expired or stopped: unread messages are dropped
        self._finished = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def open(self, timeout: float | None, metadata: Any) -> None:
        """The call's deadline (``timeout`` seconds from now) and metadata, once the caller's
        client interceptors have had their say."""
        self.context.metadata = tuple(Metadatum(k, v) for k, v in (metadata or ()))
        if timeout is None or self.status is not None:
            return
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + timeout
        if timeout <= 0:
            self.terminate(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        else:
            self._timer = loop.call_at(self.deadline, self.terminate, grpc.StatusCode.DEADLINE_EXCEEDED,
                                       "Deadline Exceeded")

    def done(self) -> bool:
        return self.status is not None

    def deliver(self, message: Any) -> None:
        if self.status is None:
            self._messages.put_nowait(message)
            self._drained.clear()

    async def send(self, message: Any) -> None:
        """Deliver a stream message, then wait until the caller has read it (or the call ended).

        The in-process twin of HTTP/2 flow control: a handler runs at most one unread message
        ahead of its caller. While it waits, what it streams from piles up on its side (the
        engine merges a request's deltas that its reader has not taken), so a caller slower
        than the engine gets fewer, larger messages, as over gRPC, instead of a queue of one
        message per step."""
        self.deliver(message)
        await self._drained.wait()

    def finish(self, code: grpc.StatusCode, details: str) -> None:
        """The handler ended: the caller reads what it sent, then this status."""
        self._set_status(code, details)

    def terminate(self, code: grpc.StatusCode, details: str, *, local_cancel: bool = False) -> bool:
        """End the call now (cancel, deadline, server stop): the handler is cancelled."""
        if self.status is not None:
            return False
        self._ended_early = True
        self.locally_cancelled = local_cancel
        self._set_status(code, details)
        if self.task is not None:
            self.task.cancel()
        return True

    def _set_status(self, code: grpc.StatusCode, details: str) -> None:
        if self.status is not None:
            return
        self.status = (code, details, self.context.trailers)
        if self._timer is not None:
            self._timer.cancel()
        self._messages.put_nowait(_EOF)
        self._drained.set()
        self._finished.set()
        for callback in self._callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        if self.status is not None:
            callback()
        else:
            self._callbacks.append(callback)

    async def wait_status(self) -> Status:
        await self._finished.wait()
        assert self.status is not None
        return self.status

    async def read(self) -> Any:
        """The next message, or ``grpc.aio.EOF`` after an OK end; raises the call's error."""
        item = _EOF if self._ended_early else await self._messages.get()
        if self._messages.empty():
            self._drained.set()
        if item is not _EOF and not self._ended_early:
            return item
        return self.end()

    def end(self) -> Any:
        assert self.status is not None
        if self.locally_cancelled:
            raise asyncio.CancelledError()
        code, details, trailers = self.status
        if code != grpc.StatusCode.OK:
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)
        return grpc.aio.EOF


class ServicerContext(grpc.aio.ServicerContext):  # type: ignore[type-arg]
    """What a handler sees of its in-process call."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self.metadata: tuple[Metadatum, ...] = ()
        self.code_set: grpc.StatusCode | None = None
        self.details_set = ""
        self.trailers: tuple[tuple[str, str | bytes], ...] = ()

    async def read(self) -> Any:
        raise RuntimeError("in-process calls have no request stream")

    async def write(self, message: Any) -> None:
        await self._rpc.send(message)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str = "",  # type: ignore[override]
                    trailing_metadata: Any = ()) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self.code_set, self.details_set = code, details
        self.trailers = tuple(trailing_metadata or ())
        raise grpc.aio.AbortError()

    def abort_with_status(self, status: Any) -> None:
        raise NotImplementedError("abort_with_status is not supported in-process; use abort()")

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self.trailers = tuple(trailing_metadata or ())

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code_set = code

    def set_details(self, details: str) -> None:
        self.details_set = details

    def code(self) -> grpc.StatusCode | None:  # type: ignore[override]
        return self.code_set

    def details(self) -> str:
        return self.details_set

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.trailers

    def set_compression(self, compression: grpc.Compression) -> None:
        pass  # nothing is encoded in-process

    def disable_next_message_compression(self) -> None:
        pass

    def peer(self) -> str:
        return LOCAL_PEER

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no TLS: an in-process caller is local, never mTLS-authenticated

    def time_remaining(self) -> float | None:
        deadline = self._rpc.deadline
        if deadline is None:
            return None
        if self._rpc.status is not None and self._rpc.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED:
            return 0.0  # expired, even if the loop's timer fired within its resolution of the deadline
        return max(0.0, deadline - asyncio.get_running_loop().time())

    def cancelled(self) -> bool:
        return self._rpc.done() and self._rpc.status is not None and (
            self._rpc.status[0] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED))

    def done(self) -> bool:
        return self._rpc.done()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._rpc.add_callback(lambda: callback(self))


class CallBase:
    """``grpc.aio.Call`` over an :class:`_Rpc` (the part unary and stream calls share)."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc

    def cancelled(self) -> bool:
        return self._rpc.locally_cancelled

    def done(self) -> bool:
        return self._rpc.done()

    def time_remaining(self) -> float | None:
        return self._rpc.context.time_remaining()

    def cancel(self) -> bool:
        return self._rpc.terminate(grpc.StatusCode.CANCELLED, "Locally cancelled by application!",
                                   local_cancel=True)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._rpc.add_callback(lambda: callback(self))

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata(*(await self._rpc.wait_status())[2])

    async def code(self) -> grpc.StatusCode:
        return (await self._rpc.wait_status())[0]

    async def details(self) -> str:
        return (await self._rpc.wait_status())[1]

    async def wait_for_connection(self) -> None:
        return None


class UnaryStreamCall(CallBase, grpc.aio.UnaryStreamCall):  # type: ignore[type-arg]
    async def read(self) -> Any:
        return await self._rpc.read()

    async def __aiter__(self) -> AsyncIterator[Any]:  # type: ignore[override]
        while (message := await self._rpc.read()) is not grpc.aio.EOF:
            yield message


class UnaryUnaryCall(CallBase, grpc.aio.UnaryUnaryCall):  # type: ignore[type-arg]
    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        return await self._rpc.read()  # the response, or the call's error
