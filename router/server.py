"""The router's gRPC server: wiring and lifecycle.

``RouterServer(config, store, tracing=...)`` serves ``llmserve.v1.Generation`` and the KServe v2
door (``inference.GRPCInferenceService``) plus health and reflection on its gRPC port, and the
OpenAI HTTP door on ``http_port`` when set; all three run through one ``GenerationCore``. The
state store (Redis or in-process) is the caller's and outlives the server, as is
the ``Tracing`` (the entry point shuts it down). The server owns its ``RouterMetrics``, served on
``/metrics`` when ``metrics_port`` is set. Stopping drains: health turns NOT_SERVING, new calls
are refused and relayed streams get ``drain_grace_s`` to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from llmserve.fleet import FleetSnapshot, Registry, StateStore, WorkerRecord
from llmserve.gc_tuning import freeze_startup_objects, unfreeze_objects
from llmserve.grpc_limits import CallGuard, GrpcPortLimits
from llmserve.grpc_server import GENERATION_SERVICE, add_health_and_reflection, bind_server, dial_target
from llmserve.kserve import grpc_service_pb2_grpc as kserve_grpc
from llmserve.limits import RequestLimits
from llmserve.open_files import raise_open_file_limit
from llmserve.security.records import FleetSecretFile
from llmserve.telemetry.metrics import MetricsServer, RouterMetrics, WorkerQueueDepth, start_metrics_server
from llmserve.telemetry.tracing import Tracing
from llmserve.v1 import generation_pb2_grpc
from router.access import AccessControl
from router.auth import ApiKeyInterceptor, ApiKeyMiddleware, is_probe
from router.dispatch import ChannelPool, Dispatcher, InflightTracker, fetch_tokenizer_files
from router.failover import CircuitBreakers, FailoverConfig
from router.frontends.http_limits import HttpConnectionLimits
from router.frontends.kserve import KSERVE_SERVICE, KServeServicer
from router.frontends.responses_config import ResponsesStoreConfig
from router.generation import GenerationCore
from router.interceptor import ErrorInterceptor
from router.policy import POLICY_NAMES, make_policy
from router.request_telemetry import UNKNOWN_MODEL, RouterTelemetry
from router.routing import Router
from router.security import RouterSecurityConfig
from router.servicer import RouterServicer
from router.tokenizers import TokenizerCache

if TYPE_CHECKING:  # FastAPI and uvicorn load only when the HTTP door is on
    from router.frontends.http_server import HttpServer
    from router.frontends.lora_api import LoraEndpoints
    from router.frontends.openai_http import OpenAIDoor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """How one router replica serves. ``port=0`` binds a free port (see ``RouterServer.port``);
    ``metrics_port``: None = no ``/metrics``, 0 = a free port (see ``RouterServer.metrics_port``);
    ``http_port``: the OpenAI HTTP API, None = off, 0 = a free port (``RouterServer.http_port``);
    ``security``: TLS, API keys and rate limits, trust in the state store (``router/security.py``).
    ``max_http_body_bytes``: the largest OpenAI HTTP request body (413 beyond, refused while it
    is read); ``max_batch_prompts``: the most prompts of one ``/v1/completions`` request (a
    batch: one request each; more is refused with 400); ``http_limits``: the HTTP door's
    connection limits (header and body timeouts, header size, open connections).
    ``grpc_limits``: the gRPC port's connections and handshake / idle timeouts and its calls'
    request timeout; ``max_concurrent_rpcs``: its calls in flight
    (``llmserve.grpc_limits.CallGuard``); ``max_kserve_stream_requests``: requests of one KServe
    ``ModelStreamInfer`` stream served at once (``router.frontends.kserve``).
    ``channel_sweep_s``: how often channels of workers gone from the registry are retired;
    ``channel_retire_grace_s``: how long a retired channel's calls in flight may still run
    (``router.dispatch.ChannelPool``). ``allow_lora_updates``: serve vLLM's runtime LoRA
    endpoints (``router.frontends.lora_api``; admin keys only when there is a key file)."""

    host: str = "127.0.0.1"
    port: int = 50050
    policy: str = "prefix"
    registry_cache_s: float = 1.0
    registry_grace_s: float = 5.0
    max_attempts: int = 3
    max_message_bytes: int = 16 * 1024 * 1024
    max_http_body_bytes: int = 16 * 1024 * 1024
    max_batch_prompts: int = 128
    http_limits: HttpConnectionLimits = HttpConnectionLimits()
    grpc_limits: GrpcPortLimits = GrpcPortLimits()
    max_concurrent_rpcs: int = 8192
    max_kserve_stream_requests: int = 64
    channel_sweep_s: float = 10.0
    channel_retire_grace_s: float = 300.0
    drain_grace_s: float = 30.0
    metrics_port: int | None = None
    http_port: int | None = None
    limits: RequestLimits = RequestLimits()  # per-request admission limits (llmserve.limits)
    failover: FailoverConfig = FailoverConfig()  # retries, breakers, liveness (router/failover.py)
    max_metadata_bytes: int = 8192
    security: RouterSecurityConfig = field(default_factory=RouterSecurityConfig)
    # model -> priority of its requests that set none (--default-priority MODEL=P)
    default_priority: Mapping[str, int] = field(default_factory=dict)
    # The OpenAI door's tool-call parser per model ("": every model's): tool_choice "auto".
    tool_call_parsers: Mapping[str, str] = field(default_factory=dict)
    reasoning_parsers: Mapping[str, str] = field(default_factory=dict)  # the same, for reasoning_content
    responses: ResponsesStoreConfig = ResponsesStoreConfig()  # stored responses of /v1/responses
    # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter at the HTTP door (admin keys only)
    allow_lora_updates: bool = False

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}"),
            (self.policy in POLICY_NAMES, f"policy must be one of {POLICY_NAMES}, got {self.policy!r}"),
            (self.registry_cache_s >= 0, "registry_cache_s must be >= 0"),
            (self.registry_grace_s >= 0, "registry_grace_s must be >= 0"),
            (self.max_attempts >= 1, "max_attempts must be >= 1"),
            (self.max_concurrent_rpcs >= 1, "max_concurrent_rpcs must be >= 1"),
            (self.max_kserve_stream_requests >= 1, "max_kserve_stream_requests must be >= 1"),
            (self.max_metadata_bytes >= 1024, "max_metadata_bytes must be at least 1024"),
            (self.max_message_bytes >= 65536, "max_message_bytes must be at least 65536"),
            (self.max_http_body_bytes >= 1024, "max_http_body_bytes must be at least 1024"),
            (self.max_batch_prompts >= 1, "max_batch_prompts must be >= 1"),
            (self.channel_sweep_s > 0, "channel_sweep_s must be positive"),
            (self.channel_retire_grace_s >= 0, "channel_retire_grace_s must be >= 0"),
            (self.drain_grace_s >= 0, "drain_grace_s must be >= 0"),
            (self.metrics_port is None or 0 <= self.metrics_port < 65536,
             f"metrics_port must be in [0, 65535], got {self.metrics_port}"),
            (self.http_port is None or 0 <= self.http_port < 65536,
             f"http_port must be in [0, 65535], got {self.http_port}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def connection_count(self) -> int:
        """Connections the router's doors may hold at once (its open-file need)."""
        http = self.http_limits.max_connections if self.http_port is not None else 0
        return self.grpc_limits.max_connections + http


class RouterServer:
    """One router replica."""

    def __init__(self, config: RouterConfig, store: StateStore, *, tracing: Tracing | None = None) -> None:
        self.config = config
        self.store = store
        self.tracing = tracing if tracing is not None else Tracing("llmserve-router")
        self.metrics = RouterMetrics()
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            *config.failover.channel_options(),
        ]
        security = config.security
        self.channels = ChannelPool(options, self.tracing.client_interceptors(), tls=security.tls.client(),
                                    retire_grace_s=config.channel_retire_grace_s)
        self.tracker = InflightTracker()
        self.registry = Registry(store, cache_s=config.registry_cache_s, grace_s=config.registry_grace_s,
                                 on_refresh=self._update_fleet_metrics, reader=security.record_reader(),
                                 max_workers_per_model=security.max_workers_per_model)
        self.access = AccessControl(security.access, self.metrics)
        self._call_guard = CallGuard(
            config.max_concurrent_rpcs, config.grpc_limits,
            lambda limit: self.metrics.on_refusal(UNKNOWN_MODEL, limit), is_probe=is_probe)
        self.router = Router(
            self.registry, TokenizerCache(self._fetch_tokenizer), make_policy(config.policy), self.tracker,
            config.limits,
        )
        self.breakers = CircuitBreakers(config.failover, on_change=self._export_breaker)
        self.dispatcher = Dispatcher(self.channels, self.tracker, config.max_attempts, config.failover,
                                     self.breakers)
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._port = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._metrics_server: MetricsServer | None = None
        self._http_server: HttpServer | None = None
        self._door: OpenAIDoor | None = None
        self._serving = False
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        return self._port

    @property
    def target(self) -> str:
        return dial_target(self.config.host, self._port)

    @property
    def http_port(self) -> int | None:
        """Port of the OpenAI HTTP API once started (None when off)."""
        return None if self._http_server is None else self._http_server.port

    def responses_running(self) -> frozenset[str]:
        """The background responses (``/v1/responses``) this router runs now."""
        return self._door.responses.running() if self._door is not None else frozenset()

    def is_serving(self) -> bool:
        """True from start until a drain begins (readiness of the HTTP and KServe doors)."""
        return self._serving

    @property
    def calls_in_flight(self) -> int:
        """gRPC calls counted against ``max_concurrent_rpcs`` now."""
        return self._call_guard.in_flight

    @property
    def metrics_port(self) -> int | None:
        """Port of ``/metrics`` once started (None when off)."""
        return None if self._metrics_server is None else self._metrics_server.port

    def _update_fleet_metrics(self, snapshot: FleetSnapshot) -> None:
        live = [w for w in snapshot.workers if not w.draining and not w.standby]
        for rejection in snapshot.rejected:
            self.metrics.on_invalid_records(rejection.reason, rejection.count)
        if snapshot.epoch_changed:
            self.metrics.fleet_store_resets.inc()
        self.metrics.update_fleet(WorkerQueueDepth(w.worker_id, w.model, w.load.queue) for w in live)
        self.metrics.update_standby(snapshot.standby_counts())
        self.breakers.sync(w.worker_id for w in snapshot.workers)

    def _export_breaker(self, worker_id: str, state: int | None) -> None:
        self.metrics.set_breaker_state(worker_id, None if state is None else int(state))

    async def _fetch_tokenizer(self, worker: WorkerRecord) -> dict[str, bytes]:
        return await fetch_tokenizer_files(self.channels, worker)

    async def start(self) -> None:
        server, self._port = bind_server(
            self.config.host,
            self.config.port,
            # The call guard first: it sees every call, and a refused one costs nothing further.
            # API keys last: the error interceptor maps what the calls it lets through raise.
            interceptors=[self._call_guard, *self.tracing.server_interceptors(), ErrorInterceptor(),
                          ApiKeyInterceptor(self.access)],
            options=[("grpc.max_receive_message_length", self.config.max_message_bytes),
                     ("grpc.max_send_message_length", self.config.max_message_bytes),
                     ("grpc.max_metadata_size", self.config.max_metadata_bytes),
                     ("grpc.absolute_max_metadata_size", self.config.max_metadata_bytes)],
            credentials=self._server_credentials(),
            port_limits=self.config.grpc_limits,
        )
        core = GenerationCore(self.router, self.dispatcher,
                              RouterTelemetry(self.tracing, self.metrics, self.config.policy), self.access,
                              self.config.default_priority, self.config.max_message_bytes)
        generation_pb2_grpc.add_GenerationServicer_to_server(RouterServicer(core), server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(core, self.is_serving, _version(), self.config.max_kserve_stream_requests), server)
        # Reflection lists llmserve.v1 only: the KServe descriptors live in a pool of their own
        # (protos/codegen.py); KServe clients bring their own stubs.
        add_health_and_reflection(server, self._health, [GENERATION_SERVICE])
        if self.config.http_port is not None:
            await self._start_http(core)
        await server.start()
        self._server = server
        self._serving = True
        for name in ("", GENERATION_SERVICE, KSERVE_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port is not None:
            self._metrics_server = start_metrics_server(self.config.metrics_port, self.metrics.registry,
                                                        self.config.host)
        await self.registry.refresh()
        self._sweeper = asyncio.create_task(self._sweep_channels())
        log.info("router listening on %s:%d (policy %s)", self.config.host, self._port, self.config.policy)

    def _lora_endpoints(self) -> LoraEndpoints | None:
        """vLLM's runtime LoRA endpoints when ``allow_lora_updates`` (docs/LORA.md)."""
        if not self.config.allow_lora_updates:
            return None
        from router.frontends.lora_api import LoraEndpoints
        from router.lora_admin import LoraAdmin

        return LoraEndpoints(LoraAdmin(self.registry, self.channels), self.access)

    async def _start_http(self, core: GenerationCore) -> None:
        from router.frontends.http_server import HttpServer
        from router.frontends.openai_http import OpenAIDoor
        from router.frontends.responses_store import ResponseStore

        secret_file = self.config.security.fleet_secret_file
        secret = FleetSecretFile(secret_file).current if secret_file else None
        door = OpenAIDoor(core, self.tracing, self.is_serving, self.config.max_http_body_bytes,
                          version=_version(), max_batch_prompts=self.config.max_batch_prompts,
                          tool_call_parsers=self.config.tool_call_parsers,
                          reasoning_parsers=self.config.reasoning_parsers,
                          responses=ResponseStore(self.store, self.config.responses, secret),
                          lora=self._lora_endpoints())
        self._door = door
        app = ApiKeyMiddleware(door.app(), self.access)
        tls = self.config.security.tls.http()
        http = HttpServer(app, self.config.host, int(self.config.http_port or 0), self.config.drain_grace_s,
                          ssl_context=tls.context if tls is not None else None,
                          limits=self.config.http_limits,
                          on_refusal=lambda limit: self.metrics.on_refusal(UNKNOWN_MODEL, limit))
        await http.start()
        self._http_server = http

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        tls = self.config.security.tls.server(require_client_certs=False)  # clients bring API keys
        return tls.credentials() if tls is not None else None

    async def _sweep_channels(self) -> None:
        """Retire the channels of workers gone from the registry, every ``channel_sweep_s``, until
        :meth:`stop` cancels it (a registry read in flight is not cancelled with it: the
        ``Registry`` shields its reads)."""
        while True:
            await asyncio.sleep(self.config.channel_sweep_s)
            snap = await self.registry.snapshot()
            self.channels.retain(w.address for w in snap.workers)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop: health NOT_SERVING, new calls refused, in-flight streams get
        ``grace_s`` (default ``config.drain_grace_s``) to end, then channels close."""
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._serving = False
        await self._health.enter_graceful_shutdown()
        stops = []
        if self._server is not None:
            log.info("router draining: up to %.1fs for in-flight streams", grace)
            stops.append(self._server.stop(grace=grace))
        if self._http_server is not None:
            stops.append(self._http_server.stop(grace))
            self._http_server = None
        if self._door is not None:  # background responses get the same grace
            stops.append(self._door.responses.drain(grace))
        await asyncio.gather(*stops)
        await self.channels.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT drain the router (once; a second signal changes nothing)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._begin_stop)

    def _begin_stop(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.stop())


def _version() -> str:
    try:
        return importlib.metadata.version("llmserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def serve(config: RouterConfig, store: StateStore, tracing: Tracing | None = None) -> None:
    """Run a router until SIGTERM / SIGINT, then drain."""
    raise_open_file_limit(config.connection_count())
    server = RouterServer(config, store, tracing=tracing)
    await server.start()
    freeze_startup_objects()
    server.install_signal_handlers()
    try:
        await server.wait_stopped()
    finally:
        await store.close()
        unfreeze_objects()
