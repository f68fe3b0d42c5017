"""``python -m router`` / ``llmserve-router``: one stateless router replica.

    python -m router --port 50050 --redis-url redis://localhost:6379/0 [--policy prefix]

Every flag also reads ``LLMSERVE_<FLAG>`` (docs/CONFIG.md); tracing is configured by the
standard ``OTEL_*`` variables (docs/OBSERVABILITY.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence

from llmserve.envflags import apply_env_defaults
from llmserve.grpc_limits import GrpcPortLimits, add_grpc_port_flags, grpc_port_limits_from_args
from llmserve.limits import add_limit_flags, limits_from_args
from llmserve.telemetry.logging import LOG_FORMATS
from router.failover import add_failover_flags, failover_from_args
from router.frontends.http_limits import add_http_flags, http_limits_from_args
from router.frontends.reasoning import REASONING_PARSERS
from router.frontends.responses_config import add_responses_flags, responses_config_from_args
from router.frontends.tool_calls import TOOL_CALL_PARSERS
from router.policy import POLICY_NAMES
from router.security_cli import add_security_flags, redis_tls, security_from_args
from router.server import RouterConfig, serve

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The router's flags, each with its ``LLMSERVE_*`` variable as default."""
    p = argparse.ArgumentParser(prog="llmserve-router", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--host", default="0.0.0.0", help="interface to bind (default: all)")
    p.add_argument("--port", type=int, default=50050,
                   help="gRPC port (llmserve.v1.Generation and the KServe v2 inference protocol)")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API on this port (default off)")
    p.add_argument("--redis-url", required=True, help="fleet state store, e.g. redis://localhost:6379/0")
    p.add_argument("--policy", choices=POLICY_NAMES, default="prefix", help="worker choice")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="worker calls per request: retries before the first token and resumptions after it")
    p.add_argument("--registry-cache-s", type=float, default=1.0,
                   help="seconds the worker registry is cached")
    p.add_argument("--drain-grace-s", type=float, default=30.0,
                   help="on SIGTERM: health NOT_SERVING, new calls refused, streams get this long to end")
    p.add_argument("--default-priority", action="append", default=[], metavar="MODEL=PRIORITY",
                   help="priority of MODEL's requests that set none (repeatable, or comma-separated in "
                        "the variable; lower runs first on workers whose scheduling policy is priority)")
    add_limit_flags(p)
    sizes = p.add_argument_group("message sizes")
    sizes.add_argument("--max-message-bytes", type=int, default=RouterConfig.max_message_bytes,
                       help="largest gRPC message received from clients or sent to workers; a request "
                            "whose message to the worker would be larger is INVALID_ARGUMENT (HTTP 413)")
    sizes.add_argument("--max-http-body-bytes", type=int, default=RouterConfig.max_http_body_bytes,
                       help="largest OpenAI HTTP request body; larger is refused with 413 while it is read")
    p.add_argument("--tool-call-parser", action="append", default=[], metavar="[MODEL=]PARSER",
                   help="how the OpenAI door reads a model's tool calls for tool_choice \"auto\" (vLLM's "
                        "flag): PARSER for every model or MODEL=PARSER (repeatable, or comma-separated in "
                        "the variable); parsers: hermes, llama3_json, mistral. Without one, \"auto\" is "
                        "refused with 400")
    p.add_argument("--allow-lora-updates", action="store_true",
                   help="serve vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter at the HTTP "
                   "door (with an API key file: admin keys only); workers load from folders under their "
                   "LoRA root")
    p.add_argument("--reasoning-parser", action="append", default=[], metavar="[MODEL=]PARSER",
                   help="how the OpenAI door splits a thinking model's reasoning from its answer (the "
                        "message's reasoning_content; vLLM's flag): PARSER for every model or "
                        "MODEL=PARSER; parsers: qwen3, deepseek_r1")
    sizes.add_argument("--max-batch-prompts", type=int, default=RouterConfig.max_batch_prompts,
                       help="most prompts of one /v1/completions request (a list of prompts: one request "
                            "each); more is refused with 400")
    add_http_flags(p)
    add_responses_flags(p)
    grpc_group = add_grpc_port_flags(p, GrpcPortLimits())
    grpc_group.add_argument("--max-concurrent-rpcs", type=int, default=RouterConfig.max_concurrent_rpcs,
                            help="calls in flight on the gRPC port, counted from their headers (health "
                                 "checks and KServe liveness / readiness may pass it by 64); one past this "
                                 "is answered RESOURCE_EXHAUSTED")
    grpc_group.add_argument("--max-kserve-stream-requests", type=int,
                            default=RouterConfig.max_kserve_stream_requests,
                            help="requests of one KServe ModelStreamInfer stream served at once (and its "
                                 "responses waiting to be read); the stream reads no further request "
                                 "until one finishes")
    add_failover_flags(p)
    add_security_flags(p)
    group = p.add_argument_group("observability (tracing: OTEL_* variables)")
    group.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus /metrics on this port (default off)")
    group.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    group.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                       help="text for people, json for log pipelines")
    apply_env_defaults(p, environ)
    return p


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    return build_parser(environ).parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The ``RouterConfig`` the flags describe (ValueError when a value is out of range)."""
    return RouterConfig(
        host=args.host,
        port=args.port,
        policy=args.policy,
        max_attempts=args.max_attempts,
        registry_cache_s=args.registry_cache_s,
        drain_grace_s=args.drain_grace_s,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        limits=limits_from_args(args),
        failover=failover_from_args(args),
        max_metadata_bytes=args.max_metadata_bytes,
        max_message_bytes=args.max_message_bytes,
        max_http_body_bytes=args.max_http_body_bytes,
        max_batch_prompts=args.max_batch_prompts,
        http_limits=http_limits_from_args(args),
        grpc_limits=grpc_port_limits_from_args(args),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_kserve_stream_requests=args.max_kserve_stream_requests,
        security=security_from_args(args),
        default_priority=parse_default_priority(args.default_priority),
        tool_call_parsers=parse_model_parsers(args.tool_call_parser, "--tool-call-parser", TOOL_CALL_PARSERS),
        reasoning_parsers=parse_model_parsers(args.reasoning_parser, "--reasoning-parser", REASONING_PARSERS),
        responses=responses_config_from_args(args),
        allow_lora_updates=args.allow_lora_updates,
    )


def parse_default_priority(values: Sequence[str] | str) -> dict[str, int]:
    """``["MODEL=PRIORITY", ...]`` (flag values; the variable ``LLMSERVE_DEFAULT_PRIORITY`` holds
    them comma-separated) -> {model: priority}; ValueError names a bad one."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out: dict[str, int] = {}
    for value in values:
        model, sep, priority = value.rpartition("=")
        try:
            if not sep or not model:
                raise ValueError
            out[model] = int(priority)
        except ValueError:
            raise ValueError(f"--default-priority takes MODEL=PRIORITY (an integer), got {value!r}") from None
    return out


def parse_model_parsers(values: Sequence[str] | str, flag: str, known: Sequence[str]) -> dict[str, str]:
    """``["hermes", "MODEL=hermes", ...]`` (``flag``'s values; its variable holds them
    comma-separated) -> {model: parser}, every model's under ""; ValueError names a bad one."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out: dict[str, str] = {}
    for value in values:
        model, _, parser = value.strip().rpartition("=")
        if parser not in known:
            raise ValueError(f"{flag} takes [MODEL=]PARSER with PARSER one of {', '.join(known)}, "
                             f"got {value!r}")
        out[model] = parser
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from llmserve.telemetry import configure_logging, setup_tracing

    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
        store_tls = redis_tls(args)
        tracing = setup_tracing("llmserve-router")  # OTEL_* environment; off imports no OpenTelemetry
    except ValueError as exc:
        print(f"llmserve-router: {exc}", file=sys.stderr)
        return 2
    from llmserve.fleet.redis_store import RedisStateStore

    try:
        asyncio.run(serve(config, RedisStateStore(args.redis_url, tls=store_tls), tracing))
    finally:
        tracing.shutdown()  # flushes the spans still buffered
    return 0


if __name__ == "__main__":
    sys.exit(main())
