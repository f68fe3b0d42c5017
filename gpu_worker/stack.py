"""``llmserve up``: a router and one CPU worker in one process, ready on localhost.

By default the components share an embedded :class:`~llmserve.fleet.MemoryStateStore` (the same
interface as the Redis store); with ``--redis-url`` everything uses Redis instead, so more
workers and routers started elsewhere join the same fleet. Serves until Ctrl-C (or SIGTERM),
then drains the worker and stops the router.

It lives in the worker package because it starts a worker (and a router, which the worker may
import: the arrow points down). The torch-free ``llmserve`` CLI finds :func:`register` through
the entry point ``llmserve.commands: up``. Torch is imported only inside :func:`run_stack`.

The router reaches this worker in-process (``StackConfig.inprocess_worker``, on by default):
its calls go straight to the worker's servicers through ``llmserve.grpc_inprocess``, with the
same interceptors, deadlines, cancellation and trace context as over gRPC, but without
serializing each chunk and crossing HTTP/2 twice. The worker still serves its gRPC port, which
other routers of a Redis fleet dial; workers started elsewhere are reached over gRPC.
``--no-inprocess-worker`` sends this worker's calls over its gRPC port too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

from gpu_worker.config import KV_CACHE_DTYPES, QUANTIZATIONS, RUNNERS, lora_modules_value
from llmserve.envflags import apply_env_defaults
from llmserve.fleet import DEFAULT_MEMORY_DOCUMENT_BYTES, open_store
from llmserve.gc_tuning import freeze_startup_objects, unfreeze_objects
from llmserve.open_files import raise_open_file_limit
from router.frontends.reasoning import REASONING_PARSERS
from router.frontends.responses_config import (
    ResponsesStoreConfig,
    add_responses_flags,
    responses_config_from_args,
)
from router.frontends.tool_calls import TOOL_CALL_PARSERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    """What ``llmserve up`` starts."""

    model: str = "smollm2-135m"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    router_port: int = 50051
    worker_port: int = 50052
    http_port: int | None = 8000  # the OpenAI HTTP API; None = off
    redis_url: str | None = None
    policy: str = "prefix"
    device: str = "cpu"
    max_num_seqs: int = 32
    num_kv_blocks: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str = "auto"
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = True  # fp8 KV scales the checkpoint lacks, from the first prefill
    drain_grace_s: float = 5.0
    inprocess_worker: bool = True  # the router calls this worker in-process (False: over gRPC)
    runner: str = "generate"  # "pooling": the model embeds (/v1/embeddings)
    lora_modules: str | None = None  # "NAME=PATH,..." LoRA adapters served as models of their own
    max_lora_rank: int = 16
    # adapters loadable at run time from folders under it (the HTTP door's /v1/load_lora_adapter
    # is then on: a local stack's operator is its only user); None: off
    lora_root: str | None = None
    max_loras: int | None = None
    tool_call_parser: str | None = None  # the OpenAI door's, for tool_choice "auto" (None: refused)
    reasoning_parser: str | None = None  # the OpenAI door's, for reasoning_content (None: off)
    responses: ResponsesStoreConfig = ResponsesStoreConfig()  # stored responses of /v1/responses
    # the in-process state store's room for stored responses (no --redis-url)
    local_store_bytes: int = DEFAULT_MEMORY_DOCUMENT_BYTES

    def __post_init__(self) -> None:
        if not (0 < self.router_port < 65536 and 0 < self.worker_port < 65536):
            raise ValueError("router_port and worker_port must be in [1, 65535]")
        if self.router_port == self.worker_port:
            raise ValueError("router and worker need different ports")
        if self.http_port is not None and not 0 < self.http_port < 65536:
            raise ValueError("http_port must be in [1, 65535]")


async def run_stack(config: StackConfig, started: asyncio.Event | None = None,
                    stop: asyncio.Event | None = None, tracing: Any = None) -> None:
    """Start worker and router on one state store; run until ``stop`` is set (or SIGINT / SIGTERM).

    ``tracing`` (an :class:`llmserve.telemetry.Tracing`, shared by both servers) is optional;
    without it neither server traces.

    The worker publishes its heartbeat and KV events through its own fleet link
    (``WorkerServer(fleet_store=...)``), exactly as a standalone worker does with ``--redis-url``.
    """
    from gpu_worker.config import EngineConfig
    from gpu_worker.server import ServerConfig, WorkerServer
    from router.server import RouterConfig, RouterServer

    store = open_store(config.redis_url, config.local_store_bytes)
    engine_config = EngineConfig(
        model=config.model,
        served_model_name=config.served_model_name,
        device=config.device,
        max_num_seqs=config.max_num_seqs,
        num_kv_blocks=config.num_kv_blocks,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        quantization=config.quantization,
        kv_cache_dtype=config.kv_cache_dtype,
        calculate_kv_scales=config.calculate_kv_scales,
        runner=config.runner,
        lora_modules=config.lora_modules,
        max_lora_rank=config.max_lora_rank,
        lora_root=config.lora_root,
        max_loras=config.max_loras,
    )
    server_config = ServerConfig(host=config.host, port=config.worker_port,
                                 drain_grace_s=config.drain_grace_s,
                                 advertise_address=f"{config.host}:{config.worker_port}")
    parsers = {"": config.tool_call_parser} if config.tool_call_parser else {}
    reasoning = {"": config.reasoning_parser} if config.reasoning_parser else {}
    router_config = RouterConfig(host=config.host, port=config.router_port, policy=config.policy,
                                 http_port=config.http_port, tool_call_parsers=parsers,
                                 reasoning_parsers=reasoning, responses=config.responses,
                                 allow_lora_updates=config.lora_root is not None)
    raise_open_file_limit(router_config.connection_count() + server_config.grpc_limits.max_connections)
    worker = WorkerServer(
        engine_config,
        server_config,
        fleet_store=store,
        tracing=tracing,
    )
    await worker.start()
    log.info("loading %s ...", config.model)
    await worker.wait_ready()
    router = RouterServer(router_config, store, tracing=tracing)
    if config.inprocess_worker:
        router.channels.add_local(worker.service.address, worker.in_process)
    await router.start()
    freeze_startup_objects()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread (tests)
            pass
    http = "" if router.http_port is None else f", OpenAI API on http://{config.host}:{router.http_port}/v1"
    hop = "in-process" if config.inprocess_worker else "gRPC"
    print(f"llmserve up: router on {router.target}{http} (worker {worker.target}, called {hop}, model "
          f"{worker.service.model_name!r}, state store {'redis' if config.redis_url else 'in-process'}); "
          "Ctrl-C to stop", flush=True)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await router.stop(grace_s=1.0)
        await worker.drain(config.drain_grace_s)  # marks draining, waits, deregisters
        await store.close()
        unfreeze_objects()


def _tensor_parallel_size(value: str) -> int:
    from gpu_worker.config import AUTO_TENSOR_PARALLEL

    return AUTO_TENSOR_PARALLEL if value == "auto" else int(value)


def register(subparsers: Any) -> None:
    """Add the ``up`` subcommand to the ``llmserve`` CLI."""
    p = subparsers.add_parser("up", help="start a local router + CPU worker (Ctrl-C to stop)")
    p.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file or alias (%(default)s)")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="router port (clients connect here)")
    p.add_argument("--worker-port", type=int, default=50052)
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port (%(default)s; 0 turns it off)")
    p.add_argument("--redis-url", default=None, help="use Redis instead of the in-process state store")
    p.add_argument("--policy", default="prefix", choices=("prefix", "least-load", "round-robin"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=_tensor_parallel_size, default=1,
                   help="ranks (GPUs) per pipeline stage, or auto (docs/PARALLELISM.md)")
    p.add_argument("--pipeline-parallel-size", type=int, default=1, help="pipeline stages")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="weight format (docs/QUANTIZATION.md; default %(default)s)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV pool element type (default %(default)s)")
    p.add_argument("--calculate-kv-scales", action=argparse.BooleanOptionalAction, default=True,
                   help="with --kv-cache-dtype fp8: scales the checkpoint lacks from the first prefill "
                        "(default on; off: 1.0)")
    p.add_argument("--inprocess-worker", action=argparse.BooleanOptionalAction, default=True,
                   help="the router calls this worker in-process, not over its gRPC port (default on)")
    p.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="how the OpenAI door reads the model's tool calls (tool_choice \"auto\")")
    p.add_argument("--runner", default="generate", choices=RUNNERS,
                   help="generate (text) or pooling (embeddings, /v1/embeddings)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders) served beside the model, each as a model of its own")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest rank a LoRA adapter may have")
    p.add_argument("--lora-root", default=None, metavar="DIR",
                   help="LoRA adapters may be loaded while serving from folders under DIR "
                        "(POST /v1/load_lora_adapter, /v1/unload_lora_adapter)")
    p.add_argument("--max-loras", type=int, default=None,
                   help="LoRA slots (adapters resident at once; default: --lora-modules, plus 4 with "
                        "--lora-root)")
    p.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                   help="how the OpenAI door splits the model's reasoning from its answer")
    add_responses_flags(p)
    p.add_argument("--local-store-bytes", type=int, default=DEFAULT_MEMORY_DOCUMENT_BYTES,
                   help="without --redis-url: the in-process store's room for stored responses (the "
                        "oldest are dropped past it)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    apply_env_defaults(p)
    p.set_defaults(func=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from llmserve.telemetry import configure_logging, setup_tracing

    configure_logging(args.log_level, args.log_format)
    tracing = setup_tracing("llmserve")  # OTEL_* environment; off by default, then a no-op
    config = StackConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        router_port=args.port,
        worker_port=args.worker_port,
        http_port=args.http_port or None,
        redis_url=args.redis_url,
        policy=args.policy,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        num_kv_blocks=args.num_kv_blocks,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        runner=args.runner,
        lora_modules=lora_modules_value(args.lora_modules),
        max_lora_rank=args.max_lora_rank,
        lora_root=args.lora_root,
        max_loras=args.max_loras,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        calculate_kv_scales=args.calculate_kv_scales,
        inprocess_worker=args.inprocess_worker,
        responses=responses_config_from_args(args),
        local_store_bytes=args.local_store_bytes,
    )
    try:
        asyncio.run(run_stack(config, tracing=tracing))
    finally:
        tracing.shutdown()
    return 0
