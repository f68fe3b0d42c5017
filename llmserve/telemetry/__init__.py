"""Observability of router and worker: tracing, Prometheus metrics, request logs.

Importing this package imports neither OpenTelemetry nor torch: OpenTelemetry loads only when
``setup_tracing`` finds tracing switched on. Names are resolved lazily (PEP 562), so
``from llmserve.telemetry import setup_tracing`` does not import prometheus_client either.
See docs/OBSERVABILITY.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmserve.telemetry.logging import LogSettings, configure_logging, log_request_finished
    from llmserve.telemetry.metrics import (
        MetricsServer,
        RouterMetrics,
        WorkerMetrics,
        WorkerQueueDepth,
        start_metrics_server,
    )
    from llmserve.telemetry.spans import RouterGenerateSpan, WorkerGenerateSpan
    from llmserve.telemetry.timeline import RequestTimeline
    from llmserve.telemetry.tracing import Tracing, TracingConfig, setup_tracing

_EXPORTS = {
    "LogSettings": "logging",
    "configure_logging": "logging",
    "log_request_finished": "logging",
    "MetricsServer": "metrics",
    "RouterMetrics": "metrics",
    "WorkerQueueDepth": "metrics",
    "WorkerMetrics": "metrics",
    "start_metrics_server": "metrics",
    "RouterGenerateSpan": "spans",
    "WorkerGenerateSpan": "spans",
    "RequestTimeline": "timeline",
    "Tracing": "tracing",
    "TracingConfig": "tracing",
    "setup_tracing": "tracing",
}

__all__ = [
    "LogSettings",
    "MetricsServer",
    "RequestTimeline",
    "RouterGenerateSpan",
    "RouterMetrics",
    "Tracing",
    "TracingConfig",
    "WorkerGenerateSpan",
    "WorkerQueueDepth",
    "WorkerMetrics",
    "configure_logging",
    "log_request_finished",
    "setup_tracing",
    "start_metrics_server",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
