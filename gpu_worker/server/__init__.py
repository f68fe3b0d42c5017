"""The worker's gRPC service: ``serve(engine_config, server_config)``.

Modules: ``server`` (wiring and lifecycle), ``servicer`` (protobuf <-> domain),
``service`` (admission and load, domain only), ``errors`` + ``interceptor`` (status
codes), ``tokenizer_files``, ``fleet_link`` (registry heartbeat when ``--redis-url``),
``request_telemetry`` (per-request span, metrics, log line) and ``engine_metrics``
(``WorkerMetrics`` refreshed from engine stats, ``/metrics``).
"""

from gpu_worker.server.server import ServerConfig, WorkerServer, serve

__all__ = ["ServerConfig", "WorkerServer", "serve"]
