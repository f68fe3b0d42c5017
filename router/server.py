"""The router's gRPC server: wiring and lifecycle.

``RouterServer(config, store, tracing=...)`` serves ``llmserve.v1.Generation`` plus health and
reflection; the state store (Redis or in-process) is the caller's and outlives the server, as is
the ``Tracing`` (the entry point shuts it down). The server owns its ``RouterMetrics``, served on
``/metrics`` when ``metrics_port`` is set. Stopping drains: health turns NOT_SERVING, new calls
are refused and relayed streams get ``drain_grace_s`` to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from llmserve.fleet import FleetSnapshot, Registry, StateStore, WorkerRecord
from llmserve.gc_tuning import freeze_startup_objects, unfreeze_objects
from llmserve.grpc_server import GENERATION_SERVICE, add_health_and_reflection, bind_server, dial_target
from llmserve.telemetry.metrics import MetricsServer, RouterMetrics, WorkerQueueDepth, start_metrics_server
from llmserve.telemetry.tracing import Tracing
from llmserve.v1 import generation_pb2_grpc
from router.dispatch import ChannelPool, Dispatcher, InflightTracker, fetch_tokenizer_files
from router.interceptor import ErrorInterceptor
from router.policy import POLICY_NAMES, make_policy
from router.request_telemetry import RouterTelemetry
from router.routing import Router
from router.servicer import RouterServicer
from router.tokenizers import TokenizerCache

log = logging.getLogger(__name__)

_CHANNEL_SWEEP_S = 10.0


@dataclass(frozen=True)
class RouterConfig:
    """How one router replica serves. ``port=0`` binds a free port (see ``RouterServer.port``);
    ``metrics_port``: None = no ``/metrics``, 0 = a free port (see ``RouterServer.metrics_port``)."""

    host: str = "127.0.0.1"
    port: int = 50050
    policy: str = "prefix"
    registry_cache_s: float = 1.0
    registry_grace_s: float = 5.0
    max_attempts: int = 3
    max_message_bytes: int = 16 * 1024 * 1024
    drain_grace_s: float = 30.0
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}"),
            (self.policy in POLICY_NAMES, f"policy must be one of {POLICY_NAMES}, got {self.policy!r}"),
            (self.registry_cache_s >= 0, "registry_cache_s must be >= 0"),
            (self.registry_grace_s >= 0, "registry_grace_s must be >= 0"),
            (self.max_attempts >= 1, "max_attempts must be >= 1"),
            (self.drain_grace_s >= 0, "drain_grace_s must be >= 0"),
            (self.metrics_port is None or 0 <= self.metrics_port < 65536,
             f"metrics_port must be in [0, 65535], got {self.metrics_port}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class RouterServer:
    """One router replica."""

    def __init__(self, config: RouterConfig, store: StateStore, *, tracing: Tracing | None = None) -> None:
        self.config = config
        self.tracing = tracing if tracing is not None else Tracing("llmserve-router")
        self.metrics = RouterMetrics()
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        self.channels = ChannelPool(options, self.tracing.client_interceptors())
        self.tracker = InflightTracker()
        self.registry = Registry(store, cache_s=config.registry_cache_s, grace_s=config.registry_grace_s,
                                 on_refresh=self._update_fleet_metrics)
        self.router = Router(
            self.registry, TokenizerCache(self._fetch_tokenizer), make_policy(config.policy), self.tracker
        )
        self.dispatcher = Dispatcher(self.channels, self.tracker, config.max_attempts)
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._port = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._metrics_server: MetricsServer | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        return self._port

    @property
    def target(self) -> str:
        return dial_target(self.config.host, self._port)

    @property
    def metrics_port(self) -> int | None:
        """Port of ``/metrics`` once started (None when off)."""
        return None if self._metrics_server is None else self._metrics_server.port

    def _update_fleet_metrics(self, snapshot: FleetSnapshot) -> None:
        live = [w for w in snapshot.workers if not w.draining]
        self.metrics.update_fleet(WorkerQueueDepth(w.worker_id, w.model, w.load.queue) for w in live)

    async def _fetch_tokenizer(self, worker: WorkerRecord) -> dict[str, bytes]:
        return await fetch_tokenizer_files(self.channels, worker)

    async def start(self) -> None:
        server, self._port = bind_server(
            self.config.host,
            self.config.port,
            interceptors=[*self.tracing.server_interceptors(), ErrorInterceptor()],
            options=[("grpc.max_receive_message_length", self.config.max_message_bytes),
                     ("grpc.max_send_message_length", self.config.max_message_bytes)],
        )
        telemetry = RouterTelemetry(self.tracing, self.metrics, self.config.policy)
        servicer = RouterServicer(self.router, self.dispatcher, telemetry)
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        add_health_and_reflection(server, self._health, [GENERATION_SERVICE])
        await server.start()
        self._server = server
        for name in ("", GENERATION_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port is not None:
            self._metrics_server = start_metrics_server(self.config.metrics_port, self.metrics.registry,
                                                        self.config.host)
        await self.registry.refresh()
        self._sweeper = asyncio.create_task(self._sweep_channels())
        log.info("router listening on %s:%d (policy %s)", self.config.host, self._port, self.config.policy)

    async def _sweep_channels(self) -> None:
        while True:
            await asyncio.sleep(_CHANNEL_SWEEP_S)
            snap = await self.registry.snapshot()
            await self.channels.retain(w.address for w in snap.workers)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop: health NOT_SERVING, new calls refused, in-flight streams get
        ``grace_s`` (default ``config.drain_grace_s``) to end, then channels close."""
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            log.info("router draining: up to %.1fs for in-flight streams", grace)
            await self._server.stop(grace=grace)
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


async def serve(config: RouterConfig, store: StateStore, tracing: Tracing | None = None) -> None:
    """Run a router until SIGTERM / SIGINT, then drain."""
    server = RouterServer(config, store, tracing=tracing)
    await server.start()
    freeze_startup_objects()
    server.install_signal_handlers()
    try:
        await server.wait_stopped()
    finally:
        await store.close()
        unfreeze_objects()
