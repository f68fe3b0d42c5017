"""Forwarding a Generate stream to workers: channels, retries, cancellation, deadlines.

The router is a gRPC proxy here: it forwards the (re-tokenized) request message and the
worker's response chunks as they are, so protobuf crosses this module by design.
Before the first chunk reaches the client, a failure that another worker may not share
(UNAVAILABLE, including a worker that cannot be connected to or whose connection stops answering
keepalive pings, and a call cut by the router closing its channel; UNKNOWN, ABORTED,
RESOURCE_EXHAUSTED other than a message over gRPC's size limit, a stream that ends early) moves the
request to the next candidate after a jittered exponential backoff. After it, a one-sequence
stream is *resumed* on the next candidate with the prompt plus the tokens already relayed
(``GenerateRequest.resume``), so the client sees one unbroken stream; other statuses, and
failures of streams that cannot be resumed (``n > 1``, prompt logprobs relayed in part:
``StreamRelay.resumable``), are passed through. At most ``max_attempts`` calls per request
(retries and resumptions together), each to a different worker whose circuit breaker lets it
through (``router.failover``). Cancelling the iterator (client gone) cancels the worker's call,
which aborts the request there and frees its KV blocks; the client's remaining deadline bounds
every attempt and every backoff. grpc.aio also raises ``CancelledError`` when a call's channel is
closed under it; only one raised in a task being cancelled is the client's cancel
(``router.errors.cancelled_by_caller``), any other is a failure of the call (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from llmserve.fleet import WorkerRecord
from llmserve.grpc_inprocess import InProcessChannel, InProcessServer
from llmserve.security.tls import ClientTls
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from router.errors import ModelUnavailable, NoTokenizer, UpstreamError, WorkersBusy, cancelled_by_caller
from router.failover import CircuitBreakers, FailoverConfig, StreamRelay, backoff_s

log = logging.getLogger(__name__)

# gRPC's own refusal of a message over max_send/receive_message_length (RESOURCE_EXHAUSTED)
_TOO_LARGE = re.compile(r"(Sent|Received) message larger than max")
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

    Channels of workers gone from the registry are retired the same way (:meth:`retain`).

    A worker in this process (``llmserve up``) is reached in-process: :meth:`add_local` maps its
    address to an ``InProcessChannel`` to its ``InProcessServer`` (``llmserve.grpc_inprocess``),
    with the same interceptors, so the dispatcher's retries, deadlines and cancellation and the
    trace context in the metadata work as over gRPC, without serializing or crossing HTTP/2.
    """

    def __init__(self, options: Sequence[tuple[str, int]] = (), interceptors: Sequence[Any] = (),
                 tls: ClientTls | None = None, retire_grace_s: float = 300.0) -> None:
        self._channels: dict[str, tuple[grpc.aio.Channel, int]] = {}
        self._options = list(options)
        self._interceptors = list(interceptors)
        self._tls = tls
        self._retire_grace_s = retire_grace_s
        self._retiring: dict[grpc.aio.Channel, asyncio.Task[None]] = {}
        self._local: dict[str, InProcessChannel] = {}

    def add_local(self, address: str, server: InProcessServer) -> None:
        """Reach the worker advertised at ``address`` in-process, through ``server`` (its owner
        stops it; a stopped server answers UNAVAILABLE, as a stopped worker's port does)."""
        self._local[address] = InProcessChannel(server, self._interceptors)

    def is_local(self, address: str) -> bool:
        """True when calls to ``address`` stay in this process."""
        return address in self._local

    def get(self, address: str) -> grpc.aio.Channel:
        local = self._local.get(address)
        if local is not None:
            return local
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

    def retain(self, addresses: Iterable[str]) -> None:
        """Retire the channels of addresses not in ``addresses`` (workers gone from the registry).

        A retired channel takes no new call (the next call to its address dials a new one) and
        closes once its calls in flight end, at most ``retire_grace_s`` later: a worker whose
        record expired (a stalled heartbeat, a store that lost its data) may still be serving
        streams, which must not be cut under it."""
        keep = set(addresses)
        for address in [a for a in self._channels if a not in keep]:
            self._retire(self._channels.pop(address)[0])

    def dialed(self, address: str) -> bool:
        """True while the pool holds a channel to ``address`` (retired ones excluded)."""
        return address in self._channels or address in self._local

    def retiring(self) -> int:
        """Retired channels still open: their calls have not all ended yet."""
        return len(self._retiring)

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

    def on_migration(self, attempt: int, worker_id: str, error: str) -> None:
        """Attempt ``attempt`` failed after chunks reached the client; the stream is resumed on
        the next candidate (which gets ``on_attempt`` too)."""


class _NoObserver:
    def on_attempt(self, attempt: int, worker_id: str) -> None:
        pass

    def on_failure(self, attempt: int, worker_id: str, error: str) -> None:
        pass

    def on_migration(self, attempt: int, worker_id: str, error: str) -> None:
        pass


@dataclass
class _Outcome:
    """How one attempt ended: ``failure`` is None when it finished the stream."""

    failure: Attempt | None = None


MoreWorkers = Callable[[frozenset[str]], Awaitable[Sequence[WorkerRecord]]]


class Dispatcher:
    """Streams a request from the first candidate that takes it, and keeps it going when that
    worker fails (module docstring; ``router.failover`` has the breakers and the relay).

    ``breakers`` are shared by every request of the router; ``rng`` draws the backoff jitter."""

    def __init__(self, channels: ChannelPool, tracker: InflightTracker, max_attempts: int = 3,
                 failover: FailoverConfig | None = None, breakers: CircuitBreakers | None = None,
                 rng: random.Random | None = None) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._channels = channels
        self._tracker = tracker
        self.max_attempts = max_attempts
        self.failover = failover if failover is not None else FailoverConfig()
        self.breakers = breakers if breakers is not None else CircuitBreakers(self.failover)
        self._rng = rng if rng is not None else random.Random()

    async def generate(
        self,
        request: gen_pb.GenerateRequest,
        workers: Sequence[WorkerRecord],
        time_remaining: Callable[[], float | None],
        observer: AttemptObserver | None = None,
        more_workers: MoreWorkers | None = None,
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        """The worker's chunks; raises a ``RouterError`` when no candidate serves the request.

        ``more_workers(tried)``: live workers not in ``tried``, best first, from a fresh read of
        the registry; asked once, when a started stream has no candidate left to resume on
        (``workers`` came from a cached view that may miss workers registered since).
        Open the iteration inside the request's span: each worker call is then its child."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        watch: AttemptObserver = observer if observer is not None else _NoObserver()
        relay = StreamRelay(request)
        failures: list[Attempt] = []
        tried: set[str] = set()
        refilled = False
        for attempt in range(1, self.max_attempts + 1):
            worker = self._pick(workers, tried)
            if worker is None and relay.started and more_workers is not None and not refilled:
                refilled = True
                workers = await more_workers(frozenset(tried))
                worker = self._pick(workers, tried)
            if worker is None:
                break
            tried.add(worker.worker_id)
            if failures and not relay.started:
                await self._backoff(len(failures), time_remaining)
            watch.on_attempt(attempt, worker.worker_id)
            outcome = _Outcome()
            async with aclosing(self._attempt(worker, relay, time_remaining, outcome)) as chunks:
                async for chunk in chunks:
                    yield chunk
            if outcome.failure is None:
                return
            failures.append(outcome.failure)
            error = f"{outcome.failure.code.name}: {outcome.failure.details}"
            if not relay.started:
                watch.on_failure(attempt, worker.worker_id, error)
                log.info("request %s: worker %s failed before its first token (%s); trying the next",
                         request.request_id, worker.worker_id, error)
                continue
            left = relay.left_to_generate()
            if left is not None and left <= 0:  # it died after its last token, before its end
                yield relay.length_end(worker.worker_id)
                return
            if not relay.resumable:
                raise UpstreamError(outcome.failure.code, outcome.failure.details)
            watch.on_migration(attempt, worker.worker_id, error)
            log.warning("request %s: worker %s failed after %d tokens (%s); resuming on another worker",
                        request.request_id, worker.worker_id, len(relay.sent_token_ids), error)
        raise _exhausted(request, relay, failures)

    def _pick(self, workers: Sequence[WorkerRecord], tried: set[str]) -> WorkerRecord | None:
        """The best candidate not tried yet whose breaker lets a request through."""
        for worker in workers:
            if worker.worker_id not in tried and self.breakers.allow(worker.worker_id):
                return worker
        log.info("no candidate left: tried %s; breakers %s", sorted(tried),
                 {w.worker_id: self.breakers.state(w.worker_id).name for w in workers})
        return None

    async def _backoff(self, retry: int, time_remaining: Callable[[], float | None]) -> None:
        delay = backoff_s(retry, self.failover, self._rng)
        remaining = time_remaining()
        if remaining is not None:
            delay = min(delay, max(0.0, remaining))
        if delay > 0:
            await asyncio.sleep(delay)

    async def _attempt(
        self, worker: WorkerRecord, relay: StreamRelay, time_remaining: Callable[[], float | None],
        outcome: _Outcome,
    ) -> AsyncGenerator[gen_pb.GenerateResponse, None]:
        """One call to ``worker``: forward its chunks through ``relay``; a failure another worker
        may not share is left in ``outcome`` (anything else raises), and the worker's breaker
        learns the verdict."""
        worker_id = worker.worker_id
        remaining = time_remaining()
        if remaining is not None and remaining <= 0:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        stub = gen_grpc.GenerationStub(self._channels.get(worker.address))
        call = stub.Generate(relay.request_for_next_attempt(), timeout=remaining)
        token = self._tracker.start(worker_id)
        served: bool | None = None  # the breaker's verdict: True served, False failed, None neither
        try:
            async for chunk in call:
                served = True
                forwarded = relay.forward(chunk)
                if forwarded is not None:
                    yield forwarded
            if relay.done:  # read to the status, so the call ends OK on both sides
                return
            served = False
            why = "the worker aborted the stream" if relay.aborted_by_worker else (
                "the stream ended early" if relay.started else "empty stream")
            outcome.failure = Attempt(worker_id, grpc.StatusCode.UNAVAILABLE, why)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if relay.done:  # failed after the stream's last chunk: the client has it all
                return
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE.match(details):
                # a message over a gRPC size limit (the router's sending, or the worker's receiving):
                # the request's fault, the same on every worker, and no sign of a busy worker
                raise UpstreamError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"request is too large: {details} (max_message_bytes, flag "
                                    "--max-message-bytes)") from None
            if code not in RETRYABLE:
                if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    served = True  # it answered: the request is at fault, not the worker
                raise UpstreamError(code, details) from None
            served = None if code == grpc.StatusCode.RESOURCE_EXHAUSTED else False
            outcome.failure = Attempt(worker_id, code, details)
        except asyncio.CancelledError:
            if cancelled_by_caller():
                raise  # the client is gone: the finally cancels the worker's call
            # No one cancelled this task: the call's channel was closed under it (a worker gone
            # from the registry for longer than the pool's retire grace). A failure of the call.
            if relay.done:
                return
            outcome.failure = Attempt(
                worker_id, grpc.StatusCode.UNAVAILABLE,
                "the router closed its connection to the worker (gone from the registry)")
        finally:
            call.cancel()  # no-op when finished; aborts the worker's request otherwise
            self._tracker.finish(worker_id, token)
            if served is True:
                self.breakers.record_success(worker_id)
            elif served is False:
                self.breakers.record_failure(worker_id)
            else:
                self.breakers.release(worker_id)


def _exhausted(request: gen_pb.GenerateRequest, relay: StreamRelay, failures: list[Attempt]) -> Exception:
    """The error of a request no attempt could finish."""
    if not failures:
        return ModelUnavailable(request.model, "the circuit breaker of every candidate worker is open")
    if relay.started:  # mid-stream, and no worker left to resume on
        return UpstreamError(failures[-1].code, failures[-1].details)
    if all(f.code == grpc.StatusCode.RESOURCE_EXHAUSTED for f in failures):
        return WorkersBusy(request.model, failures[-1].details)
    summary = "; ".join(f"{f.worker_id}: {f.code.name} {f.details}" for f in failures)
    return ModelUnavailable(request.model, f"no worker could serve the request ({summary})")


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
