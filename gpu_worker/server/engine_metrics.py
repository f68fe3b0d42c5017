"""The worker's Prometheus metrics, kept current from the engine's ``SchedulerStats``.

:class:`EngineMetrics` owns one ``WorkerMetrics`` (its own registry, nothing global), reads
``engine.stats()`` every ``interval_s`` seconds and again on every scrape of ``/metrics``
(so gauges are never staler than the scrape), and serves ``/metrics`` when given a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry

from gpu_worker.core.types import SchedulerStats
from llmserve.telemetry.metrics import MetricsServer, WorkerMetrics, start_metrics_server

logger = logging.getLogger(__name__)

StatsSource = Callable[[], SchedulerStats | None]
"""Returns the engine's current stats, or None while no engine is loaded."""


class _RefreshOnScrape:
    """A collector that exports nothing and refreshes the engine series before they are read.

    Registered first in the registry, so that prometheus_client (which collects in
    registration order) runs it before the ``WorkerMetrics`` series.
    """

    def __init__(self, refresh: Callable[[], None]) -> None:
        self._refresh = refresh

    def collect(self) -> Iterable[Any]:
        try:
            self._refresh()
        except Exception:  # noqa: BLE001 - a scrape must not fail because of the engine
            logger.exception("refreshing engine stats for a scrape failed")
        return []


class EngineMetrics:
    """``WorkerMetrics`` for one served model, refreshed from ``stats_source``; device seconds are
    priced at ``device_cost_per_hour`` (0 = unknown: no cost series)."""

    def __init__(self, model_name: str, stats_source: StatsSource, interval_s: float = 1.0,
                 device_cost_per_hour: float = 0.0, block_size: int = 0) -> None:
        """``block_size``: tokens per KV block (the pool's capacity in tokens is exported when set)."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.model_name = model_name
        self._block_size = block_size
        self._stats_source = stats_source
        self._interval_s = interval_s
        registry = CollectorRegistry()
        registry.register(_RefreshOnScrape(self.refresh))
        self.metrics = WorkerMetrics(registry, device_cost_per_hour)
        self.metrics.standby_promotions.labels(model_name)  # exported as 0 until a promotion
        self._server: MetricsServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int | None:
        """Port of the ``/metrics`` endpoint (the bound one when asked for 0), None when off."""
        return None if self._server is None else self._server.port

    def refresh(self) -> None:
        """Copy the engine's current stats into the gauges and counters (any thread)."""
        stats = self._stats_source()
        if stats is not None:
            if self._block_size:
                self.metrics.set_kv_cache_capacity(self.model_name, stats.num_total_blocks * self._block_size)
            self.metrics.update_scheduler_stats(self.model_name, stats)
            if stats.spec_decode is not None:
                self.metrics.update_spec_decode_stats(self.model_name, stats.spec_decode)

    def start(self, port: int | None, host: str = "0.0.0.0") -> None:
        """Start the periodic refresh and, when ``port`` is not None, serve ``/metrics``."""
        if port is not None:
            self._server = start_metrics_server(port, self.metrics.registry, addr=host)
            logger.info("metrics on http://%s:%d/metrics", host, self._server.port)
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        """Stop refreshing and serving."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None

    async def _refresh_loop(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep refreshing; the engine reports its own death
                logger.exception("refreshing engine stats failed")
            await asyncio.sleep(self._interval_s)
