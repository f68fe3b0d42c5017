"""Forwarding a Generate stream to workers: channels, retries, cancellation, deadlines.

The router is a gRPC proxy here: it forwards the (re-tokenized) request message and the
worker's response chunks as they are, so protobuf crosses this module by design.
Before the first chunk reaches the client, a failure that another worker may not share
(UNAVAILABLE, a broken stream, RESOURCE_EXHAUSTED) moves the request to the next candidate,
at most ``max_attempts`` workers in all. After it, the worker's status is passed through.
Cancelling the iterator (client gone) cancels the worker's call, which aborts the request
there and frees its KV blocks; the client's remaining deadline bounds every attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from llmserve.fleet import WorkerRecord
from llmserve.security.tls import ClientTls
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from router.errors import ModelUnavailable, NoTokenizer, UpstreamError, WorkersBusy

log = logging.getLogger(__name__)

RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
})


class ChannelPool:
    """One ``grpc.aio`` channel per worker address, closed when the worker is gone.

    ``interceptors`` (the tracing's client interceptors) go on every channel, so each call to a
    worker carries the caller's W3C trace context. With ``tls`` (the fleet CA and the router's
    client certificate, ``llmserve.security.tls.ClientTls``) channels are secure; when its files
    change, the next call to a worker dials a new channel with the new credentials, and the old
    one closes once its calls end (at most ``retire_grace_s`` later).
    """

    def __init__(self, options: Sequence[tuple[str, int]] = (), interceptors: Sequence[Any] = (),
                 tls: ClientTls | None = None, retire_grace_s: float = 300.0) -> None:
        self._channels: dict[str, tuple[grpc.aio.Channel, int]] = {}
        self._options = list(options)
        self._interceptors = list(interceptors)
        self._tls = tls
        self._retire_grace_s = retire_grace_s
        self._retiring: dict[grpc.aio.Channel, asyncio.Task[None]] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        generation = self._tls.generation if self._tls is not None else 0
        entry = self._channels.get(address)
        if entry is not None and entry[1] == generation:
            return entry[0]
        if entry is not None:
            self._retire(entry[0])
        interceptors = self._interceptors or None
        if self._tls is None:
            channel = grpc.aio.insecure_channel(address, options=self._options, interceptors=interceptors)
        else:
            channel = self._tls.dial(address, self._options, interceptors)
        self._channels[address] = (channel, generation)
        return channel

    def _retire(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(self._retire_grace_s))
        self._retiring[channel] = task
        task.add_done_callback(lambda _: self._retiring.pop(channel, None))

    async def retain(self, addresses: Iterable[str]) -> None:
        """Close the channels of addresses not in ``addresses``."""
        keep = set(addresses)
        for address in [a for a in self._channels if a not in keep]:
            await self._channels.pop(address)[0].close(None)

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close(None)
        self._channels.clear()
        for channel, task in list(self._retiring.items()):
            task.cancel()
            await channel.close(None)


class InflightTracker:
    """Requests this router has in flight per worker, with their wall-clock send times.

    Heartbeats report load about once a second; what this router sent since a worker's
    heartbeat is added on top so a burst does not all land on the worker that looked idle.
    """

    def __init__(self) -> None:
        self._sent: dict[str, dict[int, float]] = {}
        self._next = 0

    def start(self, worker_id: str) -> int:
        self._next += 1
        self._sent.setdefault(worker_id, {})[self._next] = time.time()
        return self._next

    def finish(self, worker_id: str, token: int) -> None:
        sent = self._sent.get(worker_id)
        if sent is not None:
            sent.pop(token, None)
            if not sent:
                del self._sent[worker_id]

    def unreported(self, worker: WorkerRecord) -> int:
        """In-flight requests sent to ``worker`` after its record's heartbeat."""
        return sum(1 for t in self._sent.get(worker.worker_id, {}).values() if t > worker.heartbeat_at)

    def in_flight(self, worker_id: str) -> int:
        return len(self._sent.get(worker_id, {}))


@dataclass(frozen=True)
class Attempt:
    """One failed try, for logs and the final error message."""

    worker_id: str
    code: grpc.StatusCode
    details: str


class AttemptObserver(Protocol):
    """Told about each try of one request (span events, metrics)."""

    def on_attempt(self, attempt: int, worker_id: str) -> None:
        """Attempt ``attempt`` (1-based) is about to call ``worker_id``."""

    def on_failure(self, attempt: int, worker_id: str, error: str) -> None:
        """Attempt ``attempt`` failed before its first chunk; the next candidate is tried."""


class _NoObserver:
    def on_attempt(self, attempt: int, worker_id: str) -> None:
        pass

    def on_failure(self, attempt: int, worker_id: str, error: str) -> None:
        pass


class Dispatcher:
    """Streams a request from the first candidate that takes it."""

    def __init__(self, channels: ChannelPool, tracker: InflightTracker, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._channels = channels
        self._tracker = tracker
        self.max_attempts = max_attempts

    async def generate(
        self,
        request: gen_pb.GenerateRequest,
        workers: Sequence[WorkerRecord],
        time_remaining: Callable[[], float | None],
        observer: AttemptObserver | None = None,
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        """The worker's chunks; raises a ``RouterError`` when no candidate serves the request.

        Open the iteration inside the request's span: each worker call is then its child."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        watch: AttemptObserver = observer if observer is not None else _NoObserver()
        failures: list[Attempt] = []
        for attempt, worker in enumerate(workers[: self.max_attempts], start=1):
            watch.on_attempt(attempt, worker.worker_id)
            stub = gen_grpc.GenerationStub(self._channels.get(worker.address))
            call = stub.Generate(request, timeout=time_remaining())
            token = self._tracker.start(worker.worker_id)
            forwarded = False
            try:
                async for chunk in call:
                    forwarded = True
                    yield chunk
                if forwarded:
                    return
                failures.append(Attempt(worker.worker_id, grpc.StatusCode.UNAVAILABLE, "empty stream"))
                watch.on_failure(attempt, worker.worker_id, "UNAVAILABLE: empty stream")
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if forwarded or code not in RETRYABLE:
                    raise UpstreamError(code, details) from None
                failures.append(Attempt(worker.worker_id, code, details))
                watch.on_failure(attempt, worker.worker_id, f"{code.name}: {details}")
                log.info("request %s: worker %s failed before its first token (%s: %s); trying the next",
                         request.request_id, worker.worker_id, code.name, details)
            finally:
                call.cancel()  # no-op when finished; aborts the worker's request otherwise
                self._tracker.finish(worker.worker_id, token)
        if failures and all(f.code == grpc.StatusCode.RESOURCE_EXHAUSTED for f in failures):
            raise WorkersBusy(request.model)
        summary = "; ".join(f"{f.worker_id}: {f.code.name} {f.details}" for f in failures)
        raise ModelUnavailable(request.model, f"no worker could serve the request ({summary})")


async def fetch_tokenizer_files(
    channels: ChannelPool, worker: WorkerRecord, timeout_s: float = 30.0
) -> dict[str, bytes]:
    """A worker's tokenizer files through ``WorkerControl.GetTokenizer``.

    :class:`NoTokenizer` when the worker serves its model without one (FAILED_PRECONDITION).
    """
    stub = int_grpc.WorkerControlStub(channels.get(worker.address))
    try:
        reply = await stub.GetTokenizer(int_pb.GetTokenizerRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            raise NoTokenizer(worker.model) from None
        raise
    return dict(reply.files)
