"""The worker's gRPC server: wiring, lifecycle (load -> serve -> drain -> stop) and ``serve``.

The port is bound and health answers NOT_SERVING before the model loads; the engine is
built in a thread (``AsyncLLM.from_config`` blocks for load + warm-up), then health turns
SERVING. A drain (SIGTERM or the Drain RPC) refuses new streams, waits for in-flight
ones up to the grace period, aborts the rest in the engine, then stops the server and
the engine.

Observability (docs/OBSERVABILITY.md): the ``Tracing`` given by the entry point supplies the
gRPC server interceptors (health and reflection untraced) and the per-request spans; the
server owns its ``WorkerMetrics`` (``EngineMetrics``), served on ``metrics_port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from gpu_worker.config import EngineConfig
from gpu_worker.core.types import SchedulerStats
from gpu_worker.server.engine_metrics import EngineMetrics
from gpu_worker.server.interceptor import ErrorInterceptor
from gpu_worker.server.request_telemetry import RequestTelemetry
from gpu_worker.server.service import WorkerService
from gpu_worker.server.types import ServedEngine
from llmserve.gc_tuning import freeze_startup_objects, unfreeze_objects
from llmserve.grpc_inprocess import InProcessServer
from llmserve.grpc_limits import WORKER_PORT_LIMITS, CallGuard, GrpcPortLimits
from llmserve.grpc_server import GENERATION_SERVICE, add_health_and_reflection, bind_server, dial_target
from llmserve.limits import RequestLimits
from llmserve.open_files import raise_open_file_limit
from llmserve.security.control import ControlAccessInterceptor
from llmserve.security.tls import RedisTls, TlsSettings
from llmserve.telemetry.tracing import Tracing
from llmserve.v1 import generation_pb2_grpc, internal_pb2, internal_pb2_grpc

logger = logging.getLogger(__name__)
_LOAD_FAILED = "the worker failed to load (the engine, or joining its fleet)"

CONTROL_SERVICE = internal_pb2.DESCRIPTOR.services_by_name["WorkerControl"].full_name
_HEALTH_NAMES = ("", GENERATION_SERVICE, CONTROL_SERVICE)
_ABORT_WAIT_S = 5.0  # after aborting leftovers, how long their streams get to send "abort"
_MIN_PING_INTERVAL_MS = 500  # keepalive pings accepted this often (routers: --worker-keepalive-s >= 1)

EngineFactory = Callable[[EngineConfig], ServedEngine]


@dataclass(frozen=True)
class ServerConfig:
    """How the worker serves (the engine's own settings are in ``EngineConfig``).

    ``port=0`` binds a free port (see :attr:`WorkerServer.port`). ``advertise_address``
    is what routers dial, default ``hostname:port``. ``max_message_bytes`` caps received
    messages (RESOURCE_EXHAUSTED beyond); replies are not capped, since GetTokenizer returns
    several megabytes (gzip-compressed) and clients set their own receive limit.
    ``metrics_port`` serves Prometheus ``/metrics`` on ``host`` (None: off; 0: a free port);
    engine stats are copied into the metrics every ``stats_interval_s`` and on each scrape.
    ``limits``: per-request admission limits (``llmserve.limits``); ``max_metadata_bytes`` caps a
    call's metadata (refused by the gRPC transport with RESOURCE_EXHAUSTED beyond).
    ``grpc_limits``: the port's connections and handshake / idle / request timeouts
    (``llmserve.grpc_limits``; idle connections are kept: routers hold theirs open on purpose);
    ``max_concurrent_rpcs``: the port's calls in flight, counted from their headers (Generate
    streams are also held to ``max_concurrent_streams``, once their request has arrived).
    Security (docs/SECURITY.md): ``tls`` serves the port over TLS, with ``tls.ca`` requiring
    client certificates from the fleet CA; ``WorkerControl`` answers only mTLS-authenticated
    and loopback peers unless ``allow_remote_control``; ``fleet_secret_file`` signs the
    worker's records; ``redis_tls`` is for a ``rediss://`` URL.
    Operations (docs/OPERATIONS.md): ``standby`` registers the loaded worker as a warm standby that
    promotes itself when its model has fewer than ``standby_min_live`` live workers or more than
    ``standby_queue_threshold`` waiting requests per live worker (None: never on the queue); it
    needs a fleet store. ``device_cost_per_hour`` (0 = unknown) prices device seconds
    (``llmserve:cost_total``, the ``cost`` of request logs and spans).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    advertise_address: str | None = None
    max_concurrent_streams: int = 1024
    max_concurrent_rpcs: int = 2048
    max_message_bytes: int = 16 * 1024 * 1024
    drain_grace_s: float = 30.0
    redis_url: str | None = None
    worker_id: str | None = None
    metrics_port: int | None = None
    stats_interval_s: float = 1.0
    limits: RequestLimits = RequestLimits()
    max_metadata_bytes: int = 8192
    grpc_limits: GrpcPortLimits = WORKER_PORT_LIMITS
    tls: TlsSettings = field(default_factory=TlsSettings)
    allow_remote_control: bool = False
    fleet_secret_file: str | None = None
    redis_tls: RedisTls = field(default_factory=RedisTls)
    standby: bool = False
    standby_min_live: int = 1
    standby_queue_threshold: float | None = None
    device_cost_per_hour: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}"),
            (self.max_metadata_bytes >= 1024, "max_metadata_bytes must be at least 1024"),
            (self.max_concurrent_streams > 0, "max_concurrent_streams must be positive"),
            (self.max_concurrent_rpcs > 0, "max_concurrent_rpcs must be positive"),
            (self.max_message_bytes > 0, "max_message_bytes must be positive"),
            (self.drain_grace_s >= 0, "drain_grace_s must be >= 0"),
            (
                self.metrics_port is None or 0 <= self.metrics_port < 65536,
                f"metrics_port must be in [0, 65535], got {self.metrics_port}",
            ),
            (self.stats_interval_s > 0, "stats_interval_s must be positive"),
            (self.standby_min_live >= 1, f"standby_min_live must be >= 1, got {self.standby_min_live}"),
            (self.standby_queue_threshold is None or self.standby_queue_threshold > 0,
             f"standby_queue_threshold must be > 0, got {self.standby_queue_threshold}"),
            (self.device_cost_per_hour >= 0,
             f"device_cost_per_hour must be >= 0, got {self.device_cost_per_hour}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _default_engine_factory(config: EngineConfig) -> ServedEngine:
    from gpu_worker.engine.async_llm import AsyncLLM  # torch: imported only when serving

    engine: ServedEngine = AsyncLLM.from_config(config)
    return engine


class WorkerServer:
    """One worker process's gRPC server around one engine.

    ``tracing`` comes from ``setup_tracing("llmserve-worker")`` in the entry point, which also
    shuts it down; None means untraced (no OpenTelemetry import).
    """

    def __init__(
        self,
        engine_config: EngineConfig,
        server_config: ServerConfig,
        engine_factory: EngineFactory = _default_engine_factory,
        fleet_store: Any = None,
        *,
        tracing: Tracing | None = None,
    ) -> None:
        self.engine_config = engine_config
        self.tracing = tracing if tracing is not None else Tracing("llmserve-worker")
        self.engine_metrics = EngineMetrics(
            engine_config.model_name, self._engine_stats, server_config.stats_interval_s,
            server_config.device_cost_per_hour, block_size=engine_config.block_size,
        )
        if server_config.standby and not (server_config.redis_url or fleet_store is not None):
            raise ValueError("a standby worker needs a fleet to watch: set --redis-url")
        self._fleet_store = fleet_store  # an llmserve.fleet.StateStore (in-process stacks)
        self.config = server_config
        self._engine_factory = engine_factory
        self._server: grpc.aio.Server | None = None
        self._in_process: InProcessServer | None = None
        self._call_guard: CallGuard | None = None
        self._health = health_aio.HealthServicer()
        self._service: WorkerService | None = None
        self._fleet: Any = None
        self._port = 0
        self._load_task: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._load_error: BaseException | None = None
        self._engine_error: BaseException | None = None  # the engine core died while serving

    @property
    def port(self) -> int:
        return self._port

    @property
    def calls_in_flight(self) -> int:
        """Calls on the gRPC port counted against ``max_concurrent_rpcs`` now (0 before start)."""
        return 0 if self._call_guard is None else self._call_guard.in_flight

    @property
    def target(self) -> str:
        """Address to dial from this host."""
        return dial_target(self.config.host, self._port)

    @property
    def metrics_port(self) -> int | None:
        """Port of ``/metrics`` once started (None when ``metrics_port`` is unset)."""
        return self.engine_metrics.port

    def _engine_stats(self) -> SchedulerStats | None:
        service = self._service
        return service.engine.stats() if service is not None and service.ready else None

    @property
    def in_process(self) -> InProcessServer:
        """The same services and interceptors as the gRPC port, for a router in this process
        (``llmserve up``; ``llmserve.grpc_inprocess``): stopped with the gRPC server."""
        assert self._in_process is not None, "start() first"
        return self._in_process

    @property
    def service(self) -> WorkerService:
        assert self._service is not None, "start() first"
        return self._service

    async def start(self) -> None:
        """Bind, start answering (health NOT_SERVING), and load the engine in the background."""
        # The limit is on what clients send; replies (GetTokenizer: megabytes) are not capped.
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            # Soft = hard limit: refused every time beyond it, not at random between the two.
            ("grpc.max_metadata_size", self.config.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", self.config.max_metadata_bytes),
            # Routers ping silent connections (requests waiting in the queue) to find frozen
            # workers; gRPC's default policy answers pings more often than every 5 min with GOAWAY.
            ("grpc.http2.min_ping_interval_without_data_ms", _MIN_PING_INTERVAL_MS),
        ]
        # Tracing first: its SERVER span then sees the status the error interceptor sets.
        interceptors = [*self.tracing.server_interceptors(), ErrorInterceptor(),
                        ControlAccessInterceptor(self.config.allow_remote_control)]
        tls = self.config.tls.server(require_client_certs=self.config.tls.ca is not None)
        # The port's call guard first (every call counted from its headers, its request read with a
        # deadline); the in-process hop has no port to guard.
        model_name = self.engine_config.model_name
        self._call_guard = CallGuard(
            self.config.max_concurrent_rpcs, self.config.grpc_limits,
            lambda limit: self.engine_metrics.metrics.on_refusal(model_name, limit))
        server, self._port = bind_server(self.config.host, self.config.port,
                                         [self._call_guard, *interceptors], options,
                                         tls.credentials() if tls is not None else None,
                                         port_limits=self.config.grpc_limits)
        address = self.config.advertise_address or f"{socket.gethostname()}:{self._port}"
        worker_id = self.config.worker_id or f"{socket.gethostname()}-{self._port}-{uuid.uuid4().hex[:8]}"
        telemetry = RequestTelemetry(self.tracing, self.engine_metrics.metrics, model_name, worker_id)
        self._service = WorkerService(
            model_name, worker_id, address, self.config.max_concurrent_streams, telemetry, self.config.limits,
            adapters=tuple(name for name, _ in self.engine_config.lora_adapters)
        )
        self._service.standby = self.config.standby
        self._add_services(server, self._service)
        self._in_process = InProcessServer(interceptors)
        self._add_servicers(self._in_process, self._service)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.engine_metrics.start(self.config.metrics_port, self.config.host)
        await server.start()
        self._server = server
        logger.info(
            "worker %s listening on %s:%d; loading %s",
            worker_id,
            self.config.host,
            self._port,
            self.engine_config.model,
        )
        self._load_task = asyncio.create_task(self._load())

    def _add_services(self, server: grpc.aio.Server, service: WorkerService) -> None:
        self._add_servicers(server, service)
        add_health_and_reflection(server, self._health, [GENERATION_SERVICE, CONTROL_SERVICE])

    def _add_servicers(self, server: grpc.aio.Server | InProcessServer, service: WorkerService) -> None:
        from gpu_worker.server.servicer import GenerationServicer, WorkerControlServicer

        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(service), server)
        internal_pb2_grpc.add_WorkerControlServicer_to_server(
            WorkerControlServicer(service, self.start_drain), server
        )

    async def _set_health(self, status: int) -> None:
        for name in _HEALTH_NAMES:
            await self._health.set(name, status)

    async def _load(self) -> None:
        try:
            engine = await asyncio.to_thread(self._engine_factory, self.engine_config)
        except Exception as exc:
            logger.exception("loading the engine failed")
            self._load_error = exc
            await self._stop_now()
            return
        if self._drain_task is not None:  # drained while loading
            await engine.shutdown()
            return
        self.service.attach_engine(engine)
        await self._export_lora(self.service.adapters)
        self.service.on_adapters_changed(self._export_lora)
        engine.on_dead(self._on_engine_dead)
        if self.config.redis_url or self._fleet_store is not None:
            try:
                await self._join_fleet()
            except Exception as exc:
                # Joining the fleet failed after the engine loaded (a missing secret file or
                # client library; an unreachable store is not a failure: the publisher retries):
                # the worker cannot be routed to, so it stops, and wait_ready raises instead of
                # waiting for a readiness that never comes.
                logger.exception("joining the fleet failed")
                self._load_error = exc
                await self._stop_now()
                return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._ready.set()
        logger.info("worker %s serving %s", self.service.worker_id, self.service.model_name)

    async def _export_lora(self, adapters: tuple[str, ...]) -> None:
        self.engine_metrics.metrics.set_lora(self.engine_config.model_name, self.engine_config.num_lora_slots,
                                             len(adapters))

    async def _join_fleet(self) -> None:
        from gpu_worker.server.fleet_link import FleetLink

        self._fleet = FleetLink(self.service, self.config.redis_url, self._fleet_store,
                                redis_tls=self.config.redis_tls,
                                fleet_secret_file=self.config.fleet_secret_file,
                                standby=self._standby_policy(), on_promoted=self._on_promoted,
                                probe_peers=self.config.tls.cert is None)
        await self._fleet.start()

    def _standby_policy(self) -> Any:
        if not self.config.standby:
            return None
        from llmserve.fleet.standby import StandbyPolicy

        return StandbyPolicy(self.config.standby_min_live, self.config.standby_queue_threshold)

    def _on_promoted(self, reason: str) -> None:
        """The standby is live now: it lists itself as serving and counts the promotion."""
        self.service.standby = False
        self.engine_metrics.metrics.on_standby_promotion(self.engine_config.model_name)

    def _on_engine_dead(self, error: BaseException) -> None:
        """The engine core died (a crash, a killed process, a lost tensor-parallel rank): nothing
        this process holds can serve again, so stop at once and let the orchestrator restart it."""
        if self._engine_error is not None:
            return
        self._engine_error = error
        logger.critical("engine core died (%s): NOT_SERVING, stopping the worker", error)
        asyncio.get_running_loop().create_task(self._stop_dead())

    async def _stop_dead(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._drain_task is None:  # requests in flight already failed with EngineDeadError
            self._drain_task = asyncio.create_task(self._stop_now())

    async def wait_ready(self) -> None:
        """Until health is SERVING; raises if loading failed or the worker stopped first."""
        assert self._load_task is not None, "start() first"
        await asyncio.wait({self._load_task}, return_when=asyncio.FIRST_COMPLETED)
        if self._load_error is not None:
            raise RuntimeError(_LOAD_FAILED) from self._load_error
        # The load task is done: it set ready, or it ended without (drained while loading, or
        # an error it did not expect), and then readiness never comes.
        if not self._ready.is_set():
            error = None if self._load_task.cancelled() else self._load_task.exception()
            raise RuntimeError("the worker stopped before it was ready") from error

    async def start_drain(self, grace_s: float = 0.0) -> int:
        """Start draining (idempotent) and return how many requests were in flight.

        ``grace_s`` of 0 means the configured ``drain_grace_s``.
        """
        in_flight = len(self.service.in_flight)
        if self._drain_task is None:
            grace = grace_s or self.config.drain_grace_s
            self._drain_task = asyncio.create_task(self._drain(grace))
        return in_flight

    async def _drain(self, grace_s: float) -> None:
        service = self.service
        in_flight = service.start_draining()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("draining: %d requests in flight, grace %.1f s", in_flight, grace_s)
        if self._fleet is not None:
            await self._fleet.mark_draining()
        if not await service.wait_idle(grace_s):
            logger.warning("grace period over: aborting %d requests", len(service.in_flight))
            await service.abort_all()
            await service.wait_idle(_ABORT_WAIT_S)
        await self._stop_now()

    async def _stop_now(self) -> None:
        await self._health.enter_graceful_shutdown()
        stops = [s.stop(grace=1.0) for s in (self._server, self._in_process) if s is not None]
        await asyncio.gather(*stops)
        if self._fleet is not None:
            await self._fleet.close()
            self._fleet = None
        if self._service is not None and self._service.ready:
            await self._service.engine.shutdown()
        await self.engine_metrics.stop()
        self._stopped.set()
        logger.info("worker stopped")

    async def drain(self, grace_s: float = 0.0) -> None:
        """Drain and wait until the worker has stopped."""
        await self.start_drain(grace_s)
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        """Until the server has stopped; raises if the engine failed to load or died."""
        await self._stopped.wait()
        if self._load_error is not None:
            raise RuntimeError(_LOAD_FAILED) from self._load_error
        if self._engine_error is not None:
            raise RuntimeError("the engine core died") from self._engine_error

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT drain; a second one aborts what is left at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._drain_task is None:
            logger.info("%s: draining", sig.name)
            asyncio.get_running_loop().create_task(self.start_drain())
        else:
            logger.info("%s again: aborting in-flight requests", sig.name)
            if self._service is not None and self._service.ready:
                asyncio.get_running_loop().create_task(self._service.abort_all())


async def serve(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    engine_factory: EngineFactory = _default_engine_factory,
    fleet_store: Any = None,
    *,
    tracing: Tracing | None = None,
) -> None:
    """Run a worker until it is drained (SIGTERM, SIGINT or the Drain RPC)."""
    raise_open_file_limit(server_config.grpc_limits.max_connections)
    server = WorkerServer(engine_config, server_config, engine_factory, fleet_store, tracing=tracing)
    await server.start()
    server.install_signal_handlers()
    freezer = asyncio.create_task(_freeze_gc_when_ready(server))
    try:
        await server.wait_stopped()
    finally:
        freezer.cancel()
        unfreeze_objects()


async def _freeze_gc_when_ready(server: WorkerServer) -> None:
    """Once the engine is loaded, take startup's objects out of the GC's reach (see gc_tuning)."""
    with contextlib.suppress(RuntimeError):  # a failed load: wait_stopped() reports it
        await server.wait_ready()
        freeze_startup_objects()
