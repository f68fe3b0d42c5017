"""``python -m gpu_worker`` / ``llmserve-worker``: serve one model over gRPC.

Engine flags mirror the fields of :class:`gpu_worker.config.EngineConfig`
(``--max-num-seqs 64``, ``--no-enable-prefix-caching``, ...); server flags are those of
:class:`gpu_worker.server.ServerConfig`. ``--redis-url`` (with ``--advertise-address``,
the host:port routers dial) registers the worker in the fleet registry.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import types
import typing
from typing import Any

from gpu_worker.config import EngineConfig


def _flag_type(hint: Any) -> Any:
    """The argparse type of an EngineConfig field: the non-None member of ``X | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (EngineConfig fields)")
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(hints[field.name])
        if kind is bool:
            group.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default
            )
        else:
            required = field.name == "model"
            group.add_argument(
                flag,
                dest=field.name,
                type=kind,
                default=None if required else field.default,
                required=required,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmserve-worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_engine_flags(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="interface to bind (default all)")
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
    server.add_argument("--log-level", default="INFO")
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, Any]:
    """(EngineConfig, ServerConfig) from parsed flags."""
    from gpu_worker.server import ServerConfig

    engine_args = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        advertise_address=args.advertise_address,
        max_concurrent_streams=args.max_concurrent_streams,
        max_message_bytes=args.max_message_bytes,
        drain_grace_s=args.drain_grace_s,
        redis_url=args.redis_url,
        worker_id=args.worker_id,
    )
    return EngineConfig(**engine_args), server_config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        engine_config, server_config = configs_from_args(args)
    except ValueError as exc:
        print(f"llmserve-worker: {exc}", file=sys.stderr)
        return 2
    from gpu_worker.server import serve

    try:
        asyncio.run(serve(engine_config, server_config))
    except RuntimeError as exc:
        logging.getLogger("gpu_worker").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
