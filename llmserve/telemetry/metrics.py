"""Prometheus metrics of worker and router, named as vLLM users know them (``llmserve:`` prefix).

Each server creates one metrics object; it owns its own ``CollectorRegistry`` (nothing is
registered in prometheus_client's global registry), so tests and several servers in one
process never collide. ``start_metrics_server(port, metrics.registry)`` serves ``/metrics``.

Worker: gauges and prefix-cache/preemption counters come from the engine's ``SchedulerStats``
(``update_scheduler_stats``, call it whenever you read stats: heartbeat or step loop), device
seconds and their cost too; per-request counters and histograms from ``on_request_finished``;
``on_refusal`` counts requests refused by an admission limit; ``on_standby_promotion`` counts a
standby's promotion. Router: ``on_request_finished``, ``on_routing_decision``, ``on_retry``,
``on_migration``, ``on_refusal``, ``on_auth_failure``, ``on_invalid_records``,
``set_breaker_state``, ``update_fleet``, ``update_standby``.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

PREFIX = "llmserve:"

# Buckets as in vLLM, with finer low ends for fast GPUs.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                             20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class SchedulerStatsLike(Protocol):
    """The fields of ``gpu_worker.core.types.SchedulerStats`` read here (no import of gpu_worker:
    this package never imports torch)."""

    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def kv_usage(self) -> float: ...
    @property
    def prefix_cache_queries(self) -> int: ...
    @property
    def prefix_cache_hits(self) -> int: ...
    @property
    def num_preemptions(self) -> int: ...
    @property
    def device_seconds(self) -> float: ...


class SpecDecodeStatsLike(Protocol):
    """The engine's cumulative speculative-decoding counters (``gpu_worker``'s ``SpecDecodeStats``)."""

    @property
    def num_drafts(self) -> int: ...
    @property
    def num_draft_tokens(self) -> int: ...
    @property
    def num_accepted_tokens(self) -> int: ...
    @property
    def num_accepted_tokens_per_pos(self) -> Sequence[int]: ...


@dataclass
class _Cumulative:
    """Last cumulative engine counters seen, to turn them into counter increments."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    device_seconds: float = 0.0


def _delta(now: float, before: float) -> float:
    # A smaller value means the engine restarted its counters: all of `now` is new.
    return now - before if now >= before else now


class WorkerMetrics:
    """The worker's metrics, every series labelled ``model_name``.

    ``device_cost_per_hour`` (``--device-cost-per-hour``; 0 = unknown) turns device seconds into
    ``llmserve:cost_total``, which is exported only when the price is known."""

    def __init__(self, registry: CollectorRegistry | None = None, device_cost_per_hour: float = 0.0) -> None:
        if device_cost_per_hour < 0:
            raise ValueError(f"device_cost_per_hour must be >= 0, got {device_cost_per_hour}")
        self.device_cost_per_hour = device_cost_per_hour
        self.registry = CollectorRegistry() if registry is None else registry
        r, m = self.registry, ["model_name"]
        self.num_requests_running = Gauge(
            PREFIX + "num_requests_running", "Requests in the running batch.", m, registry=r)
        self.num_requests_waiting = Gauge(
            PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", m, registry=r)
        self.kv_cache_usage_perc = Gauge(
            PREFIX + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", m, registry=r)
        self.kv_cache_capacity_tokens = Gauge(
            PREFIX + "kv_cache_capacity_tokens", "Tokens the KV pool holds (blocks x block size; an fp8 "
            "KV cache holds about twice a 16-bit one's).", m, registry=r)
        self.prefix_cache_queries = Counter(
            PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m, registry=r)
        self.prefix_cache_hits = Counter(
            PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", m, registry=r)
        self.num_preemptions = Counter(
            PREFIX + "num_preemptions", "Requests preempted (recompute).", m, registry=r)
        self.spec_decode_num_drafts = Counter(
            PREFIX + "spec_decode_num_drafts", "Speculative decoding: request-steps that verified drafts.",
            m, registry=r)
        self.spec_decode_num_draft_tokens = Counter(
            PREFIX + "spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified.", m,
            registry=r)
        self.spec_decode_num_accepted_tokens = Counter(
            PREFIX + "spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted.", m,
            registry=r)
        self.spec_decode_num_accepted_tokens_per_pos = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos", "Speculative decoding: drafts accepted at "
            "each position of a step (0 = first); divided by num_drafts, the acceptance rate there.",
            ["model_name", "position"], registry=r)
        self._spec_seen: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens of finished requests.", m, registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=r)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to first generated token.", m,
            buckets=TTFT_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive output tokens (time per "
            "output token), one observation per token after the first.", m, buckets=ITL_BUCKETS_S, registry=r)
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival to finish.", m,
            buckets=REQUEST_LATENCY_BUCKETS_S, registry=r)
        self.request_queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Arrival to first scheduling.", m,
            buckets=REQUEST_LATENCY_BUCKETS_S, registry=r)
        self.request_refusals = Counter(
            PREFIX + "request_refusals", "Requests refused by an admission limit, by limit (the setting's "
            "name: max_n, max_queue_len, max_tokens, max_request_id_len, ...).", ["model_name", "limit"],
            registry=r)
        self.device_seconds = Counter(
            PREFIX + "device_seconds", "Device (GPU) seconds used by requests: each engine step's time split "
            "over the requests it computed, by tokens.", m, registry=r)
        self.cost = Counter(
            PREFIX + "cost", "Cost of the device seconds at --device-cost-per-hour, in its currency "
            "(exported only when the price is set).", m, registry=r)
        self.standby_promotions = Counter(
            PREFIX + "standby_promotions", "Times this worker, started as a warm standby, promoted itself to "
            "serve (0 or 1 per worker).", m, registry=r)
        self.lora_slots = Gauge(
            PREFIX + "lora_slots", "LoRA slots: adapters the worker holds at once (--max-loras; 0: no LoRA).",
            m, registry=r)
        self.lora_adapters_loaded = Gauge(
            PREFIX + "lora_adapters_loaded", "LoRA adapters served now (--lora-modules and runtime loads).",
            m, registry=r)
        self._cumulative: dict[str, _Cumulative] = {}
        self._lock = threading.Lock()  # update_scheduler_stats may run on the engine thread

    def on_refusal(self, model: str, limit: str) -> None:
        """A request was refused because it exceeded ``limit`` (a bounded set of setting names)."""
        self.request_refusals.labels(model, limit).inc()

    def set_lora(self, model: str, slots: int, loaded: int) -> None:
        """The worker's LoRA slots and the adapters it serves now (set at start and after each
        runtime load or unload)."""
        self.lora_slots.labels(model).set(slots)
        self.lora_adapters_loaded.labels(model).set(loaded)

    def set_kv_cache_capacity(self, model: str, tokens: int) -> None:
        """The KV pool's capacity in tokens (fixed once the engine has sized it)."""
        self.kv_cache_capacity_tokens.labels(model).set(tokens)

    def update_spec_decode_stats(self, model: str, stats: SpecDecodeStatsLike) -> None:
        """Advance the speculative-decoding counters by what the engine's cumulative counters
        gained since the previous call (``SchedulerStats.spec_decode``)."""
        now = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
               tuple(stats.num_accepted_tokens_per_pos))
        with self._lock:
            before = self._spec_seen.get(model, (0, 0, 0, ()))
            self._spec_seen[model] = now
        self.spec_decode_num_drafts.labels(model).inc(_delta(now[0], before[0]))
        self.spec_decode_num_draft_tokens.labels(model).inc(_delta(now[1], before[1]))
        self.spec_decode_num_accepted_tokens.labels(model).inc(_delta(now[2], before[2]))
        per_pos = self.spec_decode_num_accepted_tokens_per_pos
        for position, accepted in enumerate(now[3]):
            seen = before[3][position] if position < len(before[3]) else 0
            per_pos.labels(model, str(position)).inc(_delta(accepted, seen))

    def update_scheduler_stats(self, model: str, stats: SchedulerStatsLike) -> None:
        """Set the gauges from a stats snapshot and advance the counters by what the engine's
        cumulative counters gained since the previous call."""
        self.num_requests_running.labels(model).set(stats.num_running)
        self.num_requests_waiting.labels(model).set(stats.num_waiting)
        self.kv_cache_usage_perc.labels(model).set(stats.kv_usage)
        with self._lock:
            seen = self._cumulative.setdefault(model, _Cumulative())
            queries = _delta(stats.prefix_cache_queries, seen.prefix_cache_queries)
            hits = _delta(stats.prefix_cache_hits, seen.prefix_cache_hits)
            preemptions = _delta(stats.num_preemptions, seen.num_preemptions)
            device_s = _delta(stats.device_seconds, seen.device_seconds)
            seen.prefix_cache_queries = stats.prefix_cache_queries
            seen.prefix_cache_hits = stats.prefix_cache_hits
            seen.num_preemptions = stats.num_preemptions
            seen.device_seconds = stats.device_seconds
        self.prefix_cache_queries.labels(model).inc(queries)
        self.prefix_cache_hits.labels(model).inc(hits)
        self.num_preemptions.labels(model).inc(preemptions)
        self.device_seconds.labels(model).inc(device_s)
        if self.device_cost_per_hour > 0:
            self.cost.labels(model).inc(self.cost_of(device_s))

    def cost_of(self, device_s: float) -> float:
        """What ``device_s`` device seconds cost at ``device_cost_per_hour`` (0 when unknown)."""
        return device_s * self.device_cost_per_hour / 3600.0

    def on_standby_promotion(self, model: str) -> None:
        """This worker was a warm standby and now serves."""
        self.standby_promotions.labels(model).inc()

    def on_request_finished(
        self,
        model: str,
        *,
        prompt_tokens: int,
        generation_tokens: int,
        finish_reason: str,
        ttft_s: float | None = None,
        itl_s: Sequence[float] = (),
        e2e_s: float | None = None,
        queue_s: float | None = None,
    ) -> None:
        """Record one finished request (each of its ``n`` sequences: call once per sequence, or
        once with summed tokens and the first sequence's timings). A timing left None (e.g. a
        request aborted before its first token) is not observed. ``itl_s``: one value per token
        after the first, as ``RequestTimeline.itl_s`` gives; or observe them as they come with
        ``observe_inter_token_latency`` and pass nothing here."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generation_tokens)
        self.request_success.labels(model, finish_reason).inc()
        if ttft_s is not None:
            self.time_to_first_token.labels(model).observe(ttft_s)
        if e2e_s is not None:
            self.e2e_request_latency.labels(model).observe(e2e_s)
        if queue_s is not None:
            self.request_queue_time.labels(model).observe(queue_s)
        if itl_s:
            self.observe_inter_token_latency(model, itl_s)

    def observe_inter_token_latency(self, model: str, itl_s: Iterable[float]) -> None:
        """Observe inter-token latencies as they happen (one value per token)."""
        histogram = self.inter_token_latency.labels(model)
        for value in itl_s:
            histogram.observe(value)


class WorkerQueueDepth(NamedTuple):
    """One live worker's queue as the router sees it, for ``RouterMetrics.update_fleet``."""

    worker_id: str
    model: str
    queue: int  # the worker's reported running + waiting requests


class RouterMetrics:
    """The router's metrics (prefix ``llmserve:router_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r, p = self.registry, PREFIX + "router_"
        self.requests = Counter(
            p + "requests", "Generate requests by model and outcome (ok or the gRPC status, lower case).",
            ["model", "outcome"], registry=r)
        self.routing_decisions = Counter(
            p + "routing_decisions", "Routing decisions by policy and reason.", ["policy", "reason"],
            registry=r)
        self.retries = Counter(p + "retries", "Requests retried on another worker.", ["model"], registry=r)
        self.migrations = Counter(
            p + "migrations", "Streams resumed on another worker after their first token (the worker failed "
            "mid-stream).", ["model"], registry=r)
        self.refusals = Counter(
            p + "refusals", "Requests refused by the router before reaching a worker, by limit (the "
            "setting's name: max_n, max_tokens, max_chat_turns, rate limits, ...).", ["model", "limit"],
            registry=r)
        self.circuit_breaker_state = Gauge(
            p + "circuit_breaker_state", "Circuit breaker of each worker this router knows: 0 closed, "
            "1 half-open, 2 open.", ["worker_id"], registry=r)
        self.auth_failures = Counter(
            p + "auth_failures", "Calls refused for their API key, by reason (missing, unknown, revoked, "
            "model_not_allowed, not_admin).", ["reason"], registry=r)
        self.invalid_worker_records = Counter(
            p + "invalid_worker_records", "Worker records read from the state store and skipped, by reason "
            "(not_json, schema, out_of_range, stale, unsigned, bad_signature, ...).", ["reason"], registry=r)
        self.fleet_store_resets = Counter(
            p + "fleet_store_resets", "Times the state store's epoch changed (it lost its data).", registry=r)
        self.live_workers = Gauge(p + "live_workers", "Live workers per model.", ["model"], registry=r)
        self.standby_workers = Gauge(
            p + "standby_workers", "Warm standby workers per model (loaded, registered, not routed to until "
            "one promotes itself).", ["model"], registry=r)
        self.worker_load = Gauge(
            p + "worker_load", "Load reported by each live worker.", ["worker_id", "model"], registry=r)
        self.request_latency = Histogram(
            p + "request_latency_seconds", "Generate latency seen by the router, arrival to last chunk.",
            ["model"], buckets=REQUEST_LATENCY_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds", "Arrival at the router to first chunk with tokens.",
            ["model"], buckets=TTFT_BUCKETS_S, registry=r)
        self._fleet_labels: tuple[set[str], set[tuple[str, str]]] = (set(), set())
        self._standby_models: set[str] = set()
        self._lock = threading.Lock()

    def on_request_finished(
        self, model: str, outcome: str, *, e2e_s: float | None = None, ttft_s: float | None = None
    ) -> None:
        """One Generate ended: ``outcome`` is ``ok`` or the gRPC status name in lower case
        (``not_found``, ``unavailable``, ``cancelled``, ``invalid_argument``...)."""
        self.requests.labels(model, outcome).inc()
        if e2e_s is not None:
            self.request_latency.labels(model).observe(e2e_s)
        if ttft_s is not None:
            self.time_to_first_token.labels(model).observe(ttft_s)

    def on_routing_decision(self, policy: str, reason: str) -> None:
        """The policy picked a worker for ``reason`` (``prefix_hit``, ``load``, ``round_robin``,
        ``hot_prefix_guard``, ``only_candidate``...)."""
        self.routing_decisions.labels(policy, reason).inc()

    def on_retry(self, model: str) -> None:
        """A request is retried on another worker."""
        self.retries.labels(model).inc()

    def on_migration(self, model: str) -> None:
        """A stream is resumed on another worker after its first token."""
        self.migrations.labels(model).inc()

    def on_refusal(self, model: str, limit: str) -> None:
        """A request was refused because it exceeded ``limit``; ``model`` is ``unknown`` when it never
        resolved (a bounded label set, as for ``requests``)."""
        self.refusals.labels(model, limit).inc()

    def on_auth_failure(self, reason: str) -> None:
        """A call was refused for its API key (``reason``: a bounded set, see ``auth_failures``)."""
        self.auth_failures.labels(reason).inc()

    def on_invalid_records(self, reason: str, count: int = 1) -> None:
        """``count`` worker records were skipped by a registry read for ``reason``."""
        self.invalid_worker_records.labels(reason).inc(count)

    def set_breaker_state(self, worker_id: str, state: int | None) -> None:
        """Export a worker's breaker state (0 closed, 1 half-open, 2 open); None removes its series
        (the worker is gone, so the label set stays bounded by the live fleet)."""
        with self._lock:
            if state is None:
                try:
                    self.circuit_breaker_state.remove(worker_id)
                except KeyError:
                    pass
            else:
                self.circuit_breaker_state.labels(worker_id).set(state)

    def update_fleet(self, workers: Iterable[WorkerQueueDepth]) -> None:
        """Set live workers per model and per-worker load from the registry's current view;
        series of models and workers gone since the previous call are removed."""
        counts: dict[str, int] = {}
        loads: dict[tuple[str, str], float] = {}
        for w in workers:
            counts[w.model] = counts.get(w.model, 0) + 1
            loads[(w.worker_id, w.model)] = w.queue
        with self._lock:
            old_models, old_workers = self._fleet_labels
            for model in old_models - counts.keys():
                self.live_workers.remove(model)
            for key in old_workers - loads.keys():
                self.worker_load.remove(*key)
            for model, count in counts.items():
                self.live_workers.labels(model).set(count)
            for key, load in loads.items():
                self.worker_load.labels(*key).set(load)
            self._fleet_labels = (set(counts), set(loads))

    def update_standby(self, counts: Mapping[str, int]) -> None:
        """Set standby workers per model from the registry's current view; models with none
        since the previous call lose their series."""
        with self._lock:
            for model in self._standby_models - counts.keys():
                self.standby_workers.remove(model)
            for model, count in counts.items():
                self.standby_workers.labels(model).set(count)
            self._standby_models = set(counts)


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (daemon thread); ``stop()`` ends it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        """The bound port (useful after asking for port 0)."""
        return int(self._httpd.server_port)

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


# Every scrape gets the classic text format: prometheus_client's OpenMetrics output turns the ':' of
# sample names into '_' unless the scraper asks for UTF-8 names (Prometheus 2.x and the OpenTelemetry
# collector do not), so `llmserve:...` queries would find nothing (prometheus/client_python#1177).
_TEXT_FORMAT = "text/plain; version=0.0.4"


def _text_format_app(registry: CollectorRegistry) -> Callable[..., Any]:
    app = make_wsgi_app(registry)

    def text_format(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return app({**environ, "HTTP_ACCEPT": _TEXT_FORMAT}, start_response)

    return text_format


class _QuietHandler(WSGIRequestHandler):
    """Each read may wait ``timeout`` seconds, and the whole connection gets ``timeout`` seconds
    (a client trickling a byte per read would otherwise hold its thread for ever): then its
    socket is shut down, which ends the handler's blocked read or write."""

    timeout = 10.0  # StreamRequestHandler sets it on the socket

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(self.timeout or 10.0, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def _expire(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes need no access log
        pass


class _BoundedServer(ThreadingWSGIServer):
    """prometheus_client's threading server serving at most ``max_connections`` connections at
    once (a thread each; one past it is closed unanswered), quiet about clients that time out or
    hang up (no traceback on stderr per connection). A client that opens idle connections by the
    thousand then holds a bounded number of threads, each for a bounded time."""

    max_connections = 32
    # the listen backlog (socketserver's is 5: a burst of connects waited out SYN retries, seconds)
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # TimeoutError, resets: the client's doing
            super().handle_error(request, client_address)


class _IPv6Server(_BoundedServer):
    address_family = socket.AF_INET6


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0", *,
                         read_timeout_s: float = 10.0, max_connections: int = 32) -> MetricsServer:
    """Serve ``registry`` in the Prometheus text format (0.0.4, whatever the scraper's Accept header)
    at ``http://addr:port/metrics`` from a daemon thread (port 0 picks a free one: read ``.port``).
    ``read_timeout_s``: how long each read of a request may wait; ``max_connections``: served at
    once (a scraper needs one)."""
    base: type[_BoundedServer] = _IPv6Server if ":" in addr else _BoundedServer
    server_class: type[_BoundedServer] = type("MetricsHttpServer", (base,),
                                              {"max_connections": max_connections})
    handler_class = type("MetricsHandler", (_QuietHandler,), {"timeout": read_timeout_s})
    httpd: WSGIServer = make_server(addr, port, _text_format_app(registry), server_class,
                                    handler_class=handler_class)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)
