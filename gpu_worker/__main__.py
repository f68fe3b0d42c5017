"""``python -m gpu_worker`` / ``llmserve-worker``: serve one model over gRPC.

Engine flags mirror the fields of :class:`gpu_worker.config.EngineConfig`
(``--max-num-seqs 64``, ``--no-enable-prefix-caching``, ...); server flags are those of
:class:`gpu_worker.server.ServerConfig`. ``--redis-url`` (with ``--advertise-address``,
the host:port routers dial) registers the worker in the fleet registry.

Every flag also reads ``LLMSERVE_<FLAG>`` (docs/CONFIG.md); tracing is configured by the
standard ``OTEL_*`` variables only (docs/OBSERVABILITY.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

from gpu_worker.config import AUTO_TENSOR_PARALLEL, EngineConfig, lora_modules_value
from gpu_worker.spec_decode.config import SpeculativeConfig
from llmserve.envflags import apply_env_defaults
from llmserve.grpc_limits import WORKER_PORT_LIMITS, add_grpc_port_flags, grpc_port_limits_from_args
from llmserve.limits import add_limit_flags, limits_from_args
from llmserve.security.flags import add_worker_security_flags, redis_tls_from_args, tls_from_args

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def _flag_type(hint: Any) -> Any:
    """The argparse type of an EngineConfig field: the non-None member of ``X | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _tensor_parallel_size(value: str) -> int:
    """A rank count, or ``auto`` (0: chosen from the model and the visible GPUs)."""
    return AUTO_TENSOR_PARALLEL if value == "auto" else int(value)


def _speculative_config(value: str) -> SpeculativeConfig:
    """The JSON object of ``--speculative-config`` (vLLM's shape)."""
    try:
        return SpeculativeConfig.from_value(value)
    except ValueError as exc:  # argparse shows this message instead of "invalid value"
        raise argparse.ArgumentTypeError(str(exc)) from None


# Engine flags whose values are not plain ``int`` / ``float`` / ``str``.
_FLAG_TYPES: dict[str, Any] = {
    "tensor_parallel_size": _tensor_parallel_size,
    "speculative_config": _speculative_config,
}


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (EngineConfig fields)")
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _FLAG_TYPES.get(field.name) or _flag_type(hints[field.name])
        if kind is bool:
            group.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default
            )
        elif field.name == "lora_modules":  # vLLM's form: --lora-modules a=/p b=/q (or "a=/p,b=/q")
            group.add_argument(flag, dest=field.name, nargs="+", default=None, metavar="NAME=PATH")
        else:
            required = field.name == "model"
            group.add_argument(
                flag,
                dest=field.name,
                type=kind,
                default=None if required else field.default,
                required=required,
            )


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The worker's flags, with ``LLMSERVE_*`` defaults read from ``environ`` (default os.environ)."""
    parser = argparse.ArgumentParser(
        prog="llmserve-worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_engine_flags(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default loopback only; 0.0.0.0 for all)")
    server.add_argument("--port", type=int, default=50051, help="port to bind, 0 = any free port")
    server.add_argument(
        "--advertise-address", default=None, help="host:port routers dial (default hostname:port)"
    )
    server.add_argument("--redis-url", default=None, help="register in the fleet registry at this Redis")
    server.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=1024,
        help="Generate streams at once before RESOURCE_EXHAUSTED",
    )
    server.add_argument(
        "--max-message-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="largest gRPC message received or sent",
    )
    server.add_argument(
        "--drain-grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM/Drain, seconds in-flight streams get before they are aborted",
    )
    server.add_argument("--worker-id", default=None, help="unique id (default hostname-port-random)")
    grpc_group = add_grpc_port_flags(parser, WORKER_PORT_LIMITS)
    grpc_group.add_argument("--max-concurrent-rpcs", type=int, default=2048,
                            help="calls in flight on the gRPC port, counted from their headers (Generate "
                                 "streams are also held to --max-concurrent-streams); one past this is "
                                 "answered RESOURCE_EXHAUSTED")
    add_limit_flags(parser)
    add_worker_security_flags(parser)
    _add_operations_flags(parser)
    _add_observability_flags(parser)
    apply_env_defaults(parser, environ)
    return parser


def _add_operations_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("operations (docs/OPERATIONS.md: warm standby, cost)")
    group.add_argument(
        "--standby", action=argparse.BooleanOptionalAction, default=False,
        help="load the model, then register as a warm standby (never routed to) that promotes itself "
        "when its model's live capacity drops (needs --redis-url)")
    group.add_argument(
        "--standby-min-live", type=int, default=1,
        help="a standby promotes itself when its model has fewer live workers than this")
    group.add_argument(
        "--standby-queue-threshold", type=float, default=None,
        help="a standby also promotes itself when the model's waiting requests per live worker stay "
        "above this (default: only on lost capacity)")
    group.add_argument(
        "--device-cost-per-hour", type=float, default=0.0,
        help="price of this worker's devices per hour (all its GPUs), for llmserve:cost_total and the "
        "request logs' cost, in any currency (default 0: unknown)")


def _add_observability_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("observability (tracing: OTEL_* variables)")
    group.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (default off)"
    )
    group.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    group.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text for people, json for log pipelines"
    )


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, Any]:
    """(EngineConfig, ServerConfig) from parsed flags."""
    from gpu_worker.server import ServerConfig

    engine_args = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    engine_args["lora_modules"] = lora_modules_value(engine_args["lora_modules"])
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        advertise_address=args.advertise_address,
        max_concurrent_streams=args.max_concurrent_streams,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_message_bytes=args.max_message_bytes,
        drain_grace_s=args.drain_grace_s,
        redis_url=args.redis_url,
        worker_id=args.worker_id,
        metrics_port=args.metrics_port,
        limits=limits_from_args(args),
        max_metadata_bytes=args.max_metadata_bytes,
        grpc_limits=grpc_port_limits_from_args(args),
        tls=tls_from_args(args),
        allow_remote_control=args.allow_remote_control,
        fleet_secret_file=args.fleet_secret_file,
        redis_tls=redis_tls_from_args(args),
        standby=args.standby,
        standby_min_live=args.standby_min_live,
        standby_queue_threshold=args.standby_queue_threshold,
        device_cost_per_hour=args.device_cost_per_hour,
    )
    if server_config.standby and not server_config.redis_url:
        raise ValueError("--standby needs --redis-url: a standby watches the fleet registry")
    return EngineConfig(**engine_args), server_config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llmserve.telemetry import configure_logging, setup_tracing

    configure_logging(args.log_level, args.log_format)
    try:
        engine_config, server_config = configs_from_args(args)
        tracing = setup_tracing("llmserve-worker")  # OTEL_* environment; off imports no OpenTelemetry
    except ValueError as exc:
        print(f"llmserve-worker: {exc}", file=sys.stderr)
        return 2
    from gpu_worker.server import serve

    try:
        asyncio.run(serve(engine_config, server_config, tracing=tracing))
    except RuntimeError as exc:
        logging.getLogger("gpu_worker").error("%s", exc)
        return 1
    finally:
        tracing.shutdown()  # flushes the spans still buffered
    return 0


if __name__ == "__main__":
    sys.exit(main())
