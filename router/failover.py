"""How the router survives failing workers: circuit breakers, retry backoff, and what a stream has
delivered so far so that another worker can resume it (docs/ROUTER.md, "Failures").

* :class:`CircuitBreakers`: per worker, *closed* (send) -> *open* after ``failure_threshold``
  consecutive failures (send nothing for ``cooldown_s``) -> *half-open* (one probe request at a
  time) -> closed on the probe's success, open again on its failure. A failure is the worker's
  fault: unreachable (including a connection attempt that does not complete within
  ``connect_timeout_s`` and a connection whose keepalive ping is not answered: a frozen
  process), a stream broken or ended early. A full queue (RESOURCE_EXHAUSTED), the client's
  deadline or cancellation say nothing about the worker. A worker that is merely slow (its event
  loop busy for seconds) is not a failure: its connection's pings are answered by gRPC's own
  threads. Only workers with a recent failure hold an entry,
  entries of workers gone from the registry are dropped (:meth:`CircuitBreakers.sync`) and the
  table is capped at ``max_tracked_workers``: memory stays bounded whatever the fleet.
* :func:`backoff_s`: exponential backoff with full jitter between attempts before the first token.
* :class:`StreamRelay`: the tokens of a stream that reached the client, and the request that
  resumes it elsewhere (``GenerateRequest.resume``) when its worker fails after the first token.

Protobuf crosses this module (the relay sees the chunks it forwards), as it does ``dispatch.py``.
"""

from __future__ import annotations

import argparse
import enum
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from llmserve.v1 import generation_pb2 as gen_pb

ABORT = "abort"
STREAM_WINDOW_BYTES = 64 * 1024  # per-stream HTTP/2 receive window of the router's worker channels
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailoverConfig:
    """Retry, breaker and liveness settings of one router (flags: :func:`add_failover_flags`)."""

    breaker_failure_threshold: int = 3
    breaker_cooldown_s: float = 5.0
    retry_backoff_base_s: float = 0.05
    retry_backoff_max_s: float = 1.0
    connect_timeout_s: float = 5.0
    keepalive_s: float = 5.0
    max_tracked_workers: int = 4096

    def __post_init__(self) -> None:
        checks = [
            (self.breaker_failure_threshold >= 1, "breaker_failure_threshold must be >= 1"),
            (self.breaker_cooldown_s > 0, "breaker_cooldown_s must be positive"),
            (self.retry_backoff_base_s >= 0, "retry_backoff_base_s must be >= 0"),
            (self.retry_backoff_max_s >= self.retry_backoff_base_s,
             "retry_backoff_max_s must be >= retry_backoff_base_s"),
            (self.connect_timeout_s > 0, "connect_timeout_s must be positive"),
            (self.keepalive_s >= 1.0, "keepalive_s must be >= 1 (workers accept pings every 0.5 s at most)"),
            (self.max_tracked_workers >= 1, "max_tracked_workers must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC options of the channels to workers: ping a connection silent for ``keepalive_s``
        and drop it when the ping is not answered within ``keepalive_s``, and give up a connection
        attempt after ``connect_timeout_s`` (gRPC's default is 20 s): a frozen or unreachable
        worker's calls then fail with UNAVAILABLE, to be retried or resumed elsewhere, instead of
        waiting for their deadlines. Reconnection backs off at most ``breaker_cooldown_s``, so a
        worker that comes back is reachable by the time its breaker probes it. Windows are fixed
        at :data:`STREAM_WINDOW_BYTES` (below)."""
        keepalive_ms = int(self.keepalive_s * 1000)
        connect_ms = int(self.connect_timeout_s * 1000)
        return [
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", keepalive_ms),
            ("grpc.http2.ping_timeout_ms", keepalive_ms),  # what enforces it in recent gRPC cores
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.min_reconnect_backoff_ms", connect_ms),  # gRPC's name for the connect timeout
            ("grpc.max_reconnect_backoff_ms", max(connect_ms, int(self.breaker_cooldown_s * 1000))),
            # Bounded memory: a stream read from a worker holds at most one fixed HTTP/2 window here
            # (BDP probing grows windows to megabytes on a fast link), so a slow client's backlog
            # stays on the worker, which merges the deltas its reader has not taken yet.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        ]


def add_failover_flags(parser: argparse.ArgumentParser) -> None:
    d = FailoverConfig()
    g = parser.add_argument_group("fault tolerance (docs/ROUTER.md)")
    g.add_argument("--breaker-failure-threshold", type=int, default=d.breaker_failure_threshold,
                   help="consecutive failures that open a worker's circuit breaker")
    g.add_argument("--breaker-cooldown-s", type=float, default=d.breaker_cooldown_s,
                   help="seconds an open breaker sends nothing before one probe request")
    g.add_argument("--retry-backoff-base-s", type=float, default=d.retry_backoff_base_s,
                   help="first retry waits up to this long (full jitter), doubling per attempt")
    g.add_argument("--retry-backoff-max-s", type=float, default=d.retry_backoff_max_s,
                   help="longest wait between two attempts")
    g.add_argument("--worker-connect-timeout-s", type=float, default=d.connect_timeout_s,
                   help="give up a connection attempt to a worker after this many seconds (a frozen "
                        "worker accepts TCP connections but never answers)")
    g.add_argument("--worker-keepalive-s", type=float, default=d.keepalive_s,
                   help="ping idle worker connections this often; drop a connection (its streams resume "
                        "elsewhere) when a ping is not answered as long")


def failover_from_args(args: argparse.Namespace) -> FailoverConfig:
    return FailoverConfig(
        breaker_failure_threshold=args.breaker_failure_threshold, breaker_cooldown_s=args.breaker_cooldown_s,
        retry_backoff_base_s=args.retry_backoff_base_s, retry_backoff_max_s=args.retry_backoff_max_s,
        connect_timeout_s=args.worker_connect_timeout_s, keepalive_s=args.worker_keepalive_s,
    )


def backoff_s(retry: int, config: FailoverConfig, rng: random.Random | None = None) -> float:
    """Wait before retry number ``retry`` (1 = the second attempt): uniform in
    ``[0, min(max, base * 2**(retry - 1))]`` ("full jitter": routers retrying at once spread out)."""
    ceiling = min(config.retry_backoff_max_s, config.retry_backoff_base_s * 2 ** (retry - 1))
    return (rng or random).uniform(0.0, ceiling)


# ---------------------------------------------------------------------- circuit breakers


class BreakerState(enum.IntEnum):
    """Values of ``llmserve:router_circuit_breaker_state``."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class _Breaker:
    __slots__ = ("state", "failures", "opened_at", "probing")

    def __init__(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False


OnChange = Callable[[str, "BreakerState | None"], None]


class CircuitBreakers:
    """One breaker per worker id (see the module docstring). Not thread-safe: the router's event
    loop is the only caller. ``on_change(worker_id, state)`` reports every change (None: the
    worker is no longer tracked nor exported), for the state gauge."""

    def __init__(self, config: FailoverConfig, clock: Callable[[], float] = time.monotonic,
                 on_change: OnChange | None = None) -> None:
        self._config = config
        self._clock = clock
        self._on_change = on_change
        self._breakers: OrderedDict[str, _Breaker] = OrderedDict()  # least recently failed first
        self._exported: set[str] = set()

    def __len__(self) -> int:
        return len(self._breakers)

    def state(self, worker_id: str) -> BreakerState:
        breaker = self._breakers.get(worker_id)
        if breaker is None:
            return BreakerState.CLOSED
        if breaker.state is BreakerState.OPEN and self._cooled_down(breaker):
            return BreakerState.HALF_OPEN
        return breaker.state

    def allow(self, worker_id: str) -> bool:
        """May a request be sent to ``worker_id`` now? An open breaker whose cool-down is over
        turns half-open and lets exactly one probe through (this call claims it)."""
        breaker = self._breakers.get(worker_id)
        if breaker is None or breaker.state is BreakerState.CLOSED:
            return True
        if breaker.state is BreakerState.OPEN:
            if not self._cooled_down(breaker):
                return False
            self._set(worker_id, breaker, BreakerState.HALF_OPEN)
        if breaker.probing:
            return False
        breaker.probing = True
        return True

    def record_success(self, worker_id: str) -> None:
        """The worker served (a first token, or an answer that is not its fault): close."""
        breaker = self._breakers.pop(worker_id, None)
        if breaker is not None and breaker.state is not BreakerState.CLOSED:
            log.warning("circuit breaker of worker %s: closed (the probe succeeded)", worker_id)
            self._report(worker_id, BreakerState.CLOSED)

    def record_failure(self, worker_id: str) -> None:
        """The worker failed a request: count it; open at the threshold (at once when half-open)."""
        breaker = self._breakers.pop(worker_id, None) or _Breaker()
        self._breakers[worker_id] = breaker  # most recently failed last
        breaker.failures += 1
        breaker.probing = False
        threshold = self._config.breaker_failure_threshold
        if breaker.state is BreakerState.HALF_OPEN or (
            breaker.state is BreakerState.CLOSED and breaker.failures >= threshold
        ):
            breaker.opened_at = self._clock()
            self._set(worker_id, breaker, BreakerState.OPEN)
        self._evict_over_cap()

    def release(self, worker_id: str) -> None:
        """An attempt ended with no verdict on the worker (cancelled, deadline, full queue): a
        half-open probe slot it held is free again."""
        breaker = self._breakers.get(worker_id)
        if breaker is not None:
            breaker.probing = False

    def sync(self, live_worker_ids: Iterable[str]) -> None:
        """The registry's current workers: forget breakers of the others, export every live one's
        state (closed ones as 0) and stop exporting the gone."""
        live = set(live_worker_ids)
        for worker_id in [w for w in self._breakers if w not in live]:
            del self._breakers[worker_id]
        for worker_id in self._exported - live:
            self._report(worker_id, None)
        for worker_id in sorted(live):
            self._report(worker_id, self.state(worker_id))
        self._exported = live

    def _cooled_down(self, breaker: _Breaker) -> bool:
        return self._clock() - breaker.opened_at >= self._config.breaker_cooldown_s

    def _set(self, worker_id: str, breaker: _Breaker, state: BreakerState) -> None:
        if breaker.state is not state:
            breaker.state = state
            log.warning("circuit breaker of worker %s: %s (%d consecutive failures)", worker_id,
                        state.name.lower().replace("_", "-"), breaker.failures)
            self._report(worker_id, state)

    def _evict_over_cap(self) -> None:
        while len(self._breakers) > self._config.max_tracked_workers:
            worker_id, _ = self._breakers.popitem(last=False)
            if worker_id not in self._exported:
                self._report(worker_id, None)

    def _report(self, worker_id: str, state: BreakerState | None) -> None:
        if self._on_change is not None:
            self._on_change(worker_id, state)


# ---------------------------------------------------------------------- resuming a stream


class StreamRelay:
    """What one request's stream delivered to the client so far, whichever workers served it.

    :meth:`forward` sees every chunk before the client does. Once any chunk went out the stream
    has *started*: a worker failing after that cannot be retried from scratch, but a one-sequence
    request can be *resumed* elsewhere with :meth:`resume_request` (the original prompt plus the
    tokens sent, ``GenerateRequest.resume``), so the client sees one unbroken stream. A stream is
    *done* at its last chunk (the one carrying ``usage``). A worker that gives a sequence up
    itself (``finish_reason`` "abort": its drain grace ran out, it shut down) fails like a broken
    stream when the request can be resumed; its tokens are forwarded, its end is not.

    The prompt's logprobs (``GenerateResponse.prompt_logprobs``, in messages before the first
    token) start the stream too. A resumed request gets none (the worker drops them), so a stream
    is resumable only while the client has all of them or none.
    """

    def __init__(self, request: gen_pb.GenerateRequest) -> None:
        self.request = request
        n = request.sampling.n if request.sampling.HasField("n") else 1
        self._one_sequence = n == 1 and request.WhichOneof("input") == "prompt_token_ids"
        self._prompt_positions = max(0, len(request.prompt_token_ids.ids) - 1)  # all prompt logprobs
        self.sent_token_ids: list[int] = []  # sequence 0's tokens that reached the client
        self.sent_prompt_logprobs = 0  # prompt positions whose logprobs reached the client
        self.started = False
        self.done = False
        self.aborted_by_worker = False

    @property
    def resumable(self) -> bool:
        """Can another worker continue the stream? Only a one-sequence request sent as token ids
        whose prompt logprobs, if it asked for them, reached the client all or not at all: the
        resuming worker does not send them (the rest would be lost)."""
        return self._one_sequence and self.sent_prompt_logprobs in (0, self._prompt_positions)

    def forward(self, chunk: gen_pb.GenerateResponse) -> gen_pb.GenerateResponse | None:
        """The chunk to send to the client (None: nothing to send)."""
        if chunk.finish_reason == ABORT and self.resumable:
            self.aborted_by_worker = True
            if not chunk.token_ids and not chunk.prompt_logprobs:
                return None
            trimmed = gen_pb.GenerateResponse(request_id=chunk.request_id, index=chunk.index, text=chunk.text,
                                              token_ids=chunk.token_ids, logprobs=chunk.logprobs,
                                              prompt_logprobs=chunk.prompt_logprobs)
            return self._sent(trimmed)
        if chunk.HasField("usage"):
            self.done = True
        return self._sent(chunk)

    def _sent(self, chunk: gen_pb.GenerateResponse) -> gen_pb.GenerateResponse:
        self.started = True
        self.sent_prompt_logprobs += len(chunk.prompt_logprobs)
        if chunk.index == 0:
            self.sent_token_ids.extend(chunk.token_ids)
        return chunk

    def left_to_generate(self) -> int | None:
        """Tokens the request may still generate (None: no max_tokens, up to the context)."""
        sampling = self.request.sampling
        if not sampling.HasField("max_tokens"):
            return None
        return sampling.max_tokens - len(self.sent_token_ids)

    def resume_request(self) -> gen_pb.GenerateRequest:
        """The same request, continuing after the tokens already sent."""
        resumed = gen_pb.GenerateRequest()
        resumed.CopyFrom(self.request)
        resumed.resume.SetInParent()  # set even before the first token: no prompt logprobs again
        resumed.resume.output_token_ids[:] = self.sent_token_ids
        return resumed

    def request_for_next_attempt(self) -> gen_pb.GenerateRequest:
        return self.resume_request() if self.started else self.request

    def length_end(self, worker_id: str) -> gen_pb.GenerateResponse:
        """The last chunk of a stream whose worker failed after sending its last token but before
        its end (nothing is left to generate): finish "length", usage as the worker would say."""
        end = gen_pb.GenerateResponse(request_id=self.request.request_id, finish_reason="length",
                                      worker_id=worker_id)
        end.usage.prompt_tokens = len(self.request.prompt_token_ids.ids)
        end.usage.completion_tokens = len(self.sent_token_ids)
        self.done = True
        return end


def describe(exc: Any) -> str:
    """``CODE: details`` of a gRPC error, for logs and span events."""
    return f"{exc.code().name}: {exc.details() or ''}"
