"""W4 (shared/BASELINES.md): W1's requests through the gRPC stack, against the offline API.

    PYTHONPATH=. python bench/bench_w4.py --commit $(git rev-parse HEAD) [--out-dir DIR]
        [--engine-core-process | --no-engine-core-process] [--stack-hops inprocess grpc] [--note TEXT]

``--engine-core-process`` serves with the engine core in its own process (worker and stack
alike); the default here is the thread, so the flag is explicit in every recorded run.

W1's requests (256 x 512 random prompt tokens, 256 output tokens, ``ignore_eos``, greedy) on
the llama3-8b shape (random bf16 weights, ``load_format="dummy"``, served without a tokenizer
since the written config folder has none), measured three (four) ways on the same card, one after
the other, each engine in its own process so each sizes its KV pool from the whole GPU:

- ``offline``: ``LLM.generate`` on all prompts at once (the offline API);
- ``grpc_worker``: a ``python -m gpu_worker`` process; a client process sends the 256
  requests at once as concurrent ``Generate`` streams;
- ``grpc_router_stack``: router and worker in one process on the in-memory state store (as
  ``llmserve up`` runs them; no Redis needed), the client talking to the router, which calls
  the worker in-process (``llmserve up``'s default); ``--stack-hops inprocess grpc`` also
  measures ``grpc_router_stack_grpc_hop``, the same stack with the router calling the worker over
  its gRPC port (``--no-inprocess-worker``). Each row records its ``worker_hop``.
- ``grpc_router_worker_procs`` (when a ``redis-server`` is found: ``$W4_REDIS_SERVER`` or
  PATH): the deployed layout, Redis, a worker process registered in it and a router process,
  each its own process; the client talks to the router.

The client (``bench_w4.py client``, its own process, asyncio + grpc.aio on one channel)
reports output tok/s (all tokens over first submit to last token), TTFT and inter-token
latency percentiles (a chunk carrying k tokens counts k gaps of 1/k of its wait). The stack
process also reports its engine's busy time and its CPU time. Appends JSON lines to the
results file and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import ResultRow, append_results, new_run_id, today  # noqa: E402

NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN = 256, 512, 256
SHAPE = "llama3-8b"
# Same engine settings for all three: bench_gpu.py's W1 settings.
ENGINE = dict(load_format="dummy", max_model_len=2048, max_num_batched_tokens=8192, max_num_seqs=256,
              enable_prefix_caching=False, gpu_memory_utilization=0.9)
RESULT = "W4RESULT "
HOPS = ("inprocess", "grpc")  # how the one-process stack's router calls its worker
STACK_ENGINES = {"inprocess": "grpc_router_stack", "grpc": "grpc_router_stack_grpc_hop"}
TARGET_COST = 0.10
# CPU smoke test of the script's plumbing: W4_SMOKE_MODEL=<tiny model folder> shrinks everything.
SMOKE_MODEL = os.environ.get("W4_SMOKE_MODEL")
if SMOKE_MODEL:
    NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN = 8, 16, 8
    ENGINE = dict(load_format="dummy", device="cpu", num_kv_blocks=128, max_num_seqs=8,
                  enable_prefix_caching=False)


def write_config(root: Path) -> Path:
    if SMOKE_MODEL:
        return Path(SMOKE_MODEL)
    import bench_gpu  # torch at import: only in subprocesses / the GPU machine

    return bench_gpu.write_config(SHAPE, root)


def prompts(num_requests: int = NUM_REQUESTS, prompt_len: int = PROMPT_LEN) -> list[list[int]]:
    vocab = 40000 if SMOKE_MODEL else 128000
    return np.random.default_rng(1).integers(0, vocab, size=(num_requests, prompt_len)).tolist()


def _emit(payload: dict[str, Any]) -> None:
    print(RESULT + json.dumps(payload), flush=True)


# ----------------------------------------------------------------------------- offline


def run_offline(model_dir: str) -> None:
    import torch

    from gpu_worker.llm import LLM
    from gpu_worker.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model_dir, **ENGINE)  # type: ignore[arg-type]
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate(prompts()[:8], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate(prompts(), params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    _emit(dict(engine="offline_llm", card=card, output_tok_s=tokens / elapsed,
               elapsed_s=elapsed, output_tokens=tokens, load_s=load_s))


# ----------------------------------------------------------------------------- client


async def _one(stub: Any, pb: Any, ids: list[int], max_tokens: int, t0: float) -> list[tuple[float, int]]:
    request = pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    arrivals = []
    async for chunk in stub.Generate(request):
        if chunk.token_ids:
            arrivals.append((time.perf_counter() - t0, len(chunk.token_ids)))
    return arrivals


async def _client(target: str, num_requests: int, prompt_len: int, output_len: int) -> dict[str, Any]:
    import grpc

    from llmserve.v1 import generation_pb2 as pb
    from llmserve.v1 import generation_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.GenerationStub(channel)
        batch = prompts(num_requests, prompt_len)
        await asyncio.gather(*(_one(stub, pb, p, 16, time.perf_counter()) for p in batch[:8]))
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(_one(stub, pb, p, output_len, t0) for p in batch))
    ttft, itl = [], []
    tokens = chunks = 0
    end = 0.0
    for arrivals in streams:
        ttft.append(arrivals[0][0])
        prev = arrivals[0][0]
        for t, k in arrivals[1:]:
            itl.extend([(t - prev) / k] * k)
            prev = t
        tokens += sum(k for _, k in arrivals)
        chunks += len(arrivals)
        end = max(end, arrivals[-1][0])

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(xs), q)) * 1e3

    return dict(output_tok_s=tokens / end, elapsed_s=end, output_tokens=tokens, output_chunks=chunks,
                tokens_per_chunk=tokens / chunks, ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99),
                itl_p50_ms=pct(itl, 50), itl_p99_ms=pct(itl, 99))


def run_client(target: str, num_requests: int = NUM_REQUESTS, prompt_len: int = PROMPT_LEN,
               output_len: int = OUTPUT_LEN) -> None:
    _emit(asyncio.run(_client(target, num_requests, prompt_len, output_len)))


# ----------------------------------------------------------------------------- router + worker


async def _stack(model_dir: str, router_port: int, worker_port: int, core_process: bool,
                 engine: dict[str, Any], worker_hop: str = "inprocess") -> None:
    """Router + worker on one in-memory state store in this process (as gpu_worker/stack.py);
    ``worker_hop``: how the router calls the worker, "inprocess" or "grpc"."""
    from gpu_worker.config import EngineConfig
    from gpu_worker.server import ServerConfig, WorkerServer
    from llmserve.fleet import open_store
    from llmserve.gc_tuning import freeze_startup_objects, unfreeze_objects
    from router.server import RouterConfig, RouterServer

    store = open_store(None)
    worker = WorkerServer(
        EngineConfig(model=model_dir, engine_core_process=core_process, **engine),
        ServerConfig(host="127.0.0.1", port=worker_port, drain_grace_s=1.0,
                     advertise_address=f"127.0.0.1:{worker_port}"),
        fleet_store=store,
    )
    await worker.start()
    await worker.wait_ready()
    router = RouterServer(RouterConfig(host="127.0.0.1", port=router_port), store)
    if worker_hop == "inprocess":
        router.channels.add_local(worker.service.address, worker.in_process)
    await router.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if not os.environ.get("W4_NO_GC_FREEZE"):  # as gpu_worker/stack.py does once started
        freeze_startup_objects()
    gc_watch = _GcWatch()
    profile_path = os.environ.get("W4_CPROFILE")  # event-loop thread only, e.g. /tmp/stack.prof
    profiler = cProfile.Profile() if profile_path else None
    cpu0, wall0 = os.times(), time.perf_counter()
    print("STACK READY", flush=True)
    if profiler is not None:
        profiler.enable()
    await stop.wait()
    if profiler is not None and profile_path:
        profiler.disable()
        profiler.dump_stats(profile_path)
    cpu1, wall = os.times(), time.perf_counter() - wall0
    gc_watch.close()
    extra = worker.service.engine.stats().extra
    _emit(dict(worker_hop=worker_hop, stack_wall_s=wall,
               stack_cpu_s=(cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
               engine_steps=extra.get("engine_steps"), engine_step_time_s=extra.get("engine_step_time_s"),
               gc_s=gc_watch.seconds, gc_collections=gc_watch.collections,
               gc_s_by_generation=[round(x, 3) for x in gc_watch.seconds_by_generation]))
    await router.stop(grace_s=0.5)
    await worker.drain(0.5)
    await store.close()
    unfreeze_objects()


class _GcWatch:
    """CPU time of the cyclic garbage collector, and collections per generation, while open."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self.seconds_by_generation = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.thread_time()  # CPU time: a preempted collection is not inflated
        else:
            elapsed = time.thread_time() - self._start
            self.seconds += elapsed
            self.collections[info["generation"]] += 1
            self.seconds_by_generation[info["generation"]] += elapsed

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)


def run_stack(model_dir: str, router_port: int, worker_port: int, core_process: bool,
              engine: dict[str, Any] | None = None, worker_hop: str = "inprocess") -> None:
    asyncio.run(_stack(model_dir, router_port, worker_port, core_process, {**ENGINE, **(engine or {})},
                       worker_hop))


# ----------------------------------------------------------------------------- driver


def _core_flag(core_process: bool) -> str:
    return "--engine-core-process" if core_process else "--no-engine-core-process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _script(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _results(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(RESULT):]) for line in text.splitlines() if line.startswith(RESULT)]


def _wait_models(target: str, timeout_s: float, proc: subprocess.Popen[str]) -> None:
    import grpc

    from llmserve.v1 import generation_pb2 as pb
    from llmserve.v1 import generation_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                models = stub.ListModels(pb.ListModelsRequest(), timeout=2).models
                if models and models[0].max_model_len > 0:  # 0 while the worker still loads
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{target} did not list a model in {timeout_s} s")


def _serve_and_measure(
    cmd: list[str], target: str, log: Path, before: Sequence[tuple[list[str], Path]] = ()
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start a server process (after the ``before`` processes, e.g. Redis and a worker), run
    the client against ``target``, stop them all (last started first); (client result, results
    printed by the ``cmd`` process)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []
    try:
        for other_cmd, other_log in [*before, (cmd, log)]:
            out = other_log.open("w")
            procs.append(
                subprocess.Popen(other_cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
            )
            out.close()  # the child holds its own descriptor
        _wait_models(target, 600, procs[-1])
        client = subprocess.run(_script("client", "--target", target), capture_output=True, text=True,
                                env=env, timeout=600)
        if client.returncode != 0:
            raise RuntimeError(f"client failed: {client.stderr[-3000:]}")
        result = _results(client.stdout)[0]
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return result, _results(log.read_text())


def _redis_server() -> str | None:
    """A redis-server binary: ``$W4_REDIS_SERVER`` or the one on PATH (None: skip that path)."""
    return os.environ.get("W4_REDIS_SERVER") or shutil.which("redis-server")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("offline").add_argument("--model", required=True)
    cl = sub.add_parser("client")
    cl.add_argument("--target", required=True)
    _size_args(cl)
    st = sub.add_parser("stack")
    st.add_argument("--model", required=True)
    st.add_argument("--router-port", type=int, required=True)
    st.add_argument("--worker-port", type=int, required=True)
    st.add_argument("--engine-core-process", action=argparse.BooleanOptionalAction, default=False)
    st.add_argument("--engine-json", default="{}", help="EngineConfig fields overriding ENGINE (JSON)")
    st.add_argument("--worker-hop", choices=HOPS, default="inprocess")
    local = sub.add_parser("local", help="CPU reproduction: stack + client on this machine, "
                           "stack CPU per chunk (see run_local)")
    local.add_argument("--model", required=True)
    local.add_argument("--profile", default=None, help="py-spy output file (.txt: raw stacks, else svg)")
    local.add_argument("--engine-core-process", action=argparse.BooleanOptionalAction, default=True)
    local.add_argument("--worker-hop", choices=HOPS, default="inprocess",
                       help="how the router calls the worker (%(default)s)")
    _size_args(local)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--engine-core-process", action=argparse.BooleanOptionalAction, default=False,
                    help="serve with the engine core in its own process (EngineConfig.engine_core_process)")
    ap.add_argument("--note", default=None, help="note stored with each result row")
    ap.add_argument("--stack-hops", nargs="+", choices=HOPS, default=["inprocess"],
                    help="router-to-worker hops of the one-process stack to measure, one row each "
                    "(default: inprocess, as llmserve up)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    ap.add_argument("--results", type=Path, default=Path("docs/benchmarks/results.jsonl"))
    args = ap.parse_args()
    if args.cmd == "offline":
        return run_offline(args.model)
    if args.cmd == "client":
        return run_client(args.target, args.num_requests, args.prompt_len, args.output_len)
    if args.cmd == "stack":
        return run_stack(args.model, args.router_port, args.worker_port, args.engine_core_process,
                         json.loads(args.engine_json), args.worker_hop)
    if args.cmd == "local":
        return run_local(args)
    drive(args)


def _size_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS)
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    parser.add_argument("--output-len", type=int, default=OUTPUT_LEN)


def run_local(args: argparse.Namespace) -> None:
    """The router + worker stack on a tiny CPU model, so the stack process's own CPU per chunk shows.

        PYTHONPATH=. python bench/bench_w4.py local --model TINY_DIR --num-requests 256 \\
            --prompt-len 32 --output-len 128 [--profile stack.txt]

    ``TINY_DIR``: ``make_tiny_model("llama", dir)`` (tests/helpers/tiny_models.py). Prints the
    client's result and the stack's CPU seconds per output chunk / token (the engine core runs
    in its own process unless ``--no-engine-core-process``, so it is not counted).
    """
    blocks_per_seq = -(-(args.prompt_len + args.output_len) // 16) + 1
    engine = dict(load_format="dummy", device="cpu", max_num_seqs=args.num_requests,
                  num_kv_blocks=args.num_requests * blocks_per_seq + 64, enable_prefix_caching=False,
                  max_num_batched_tokens=max(2048, args.prompt_len * 16))
    router_port, worker_port = _free_port(), _free_port()
    cmd = _script("stack", "--model", args.model, "--router-port", str(router_port), "--worker-port",
                  str(worker_port), _core_flag(args.engine_core_process), "--engine-json", json.dumps(engine),
                  "--worker-hop", args.worker_hop)
    target = f"127.0.0.1:{router_port}"
    # The client's prompts stay inside the tiny model's vocabulary (prompts(): W4_SMOKE_MODEL).
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "W4_SMOKE_MODEL": os.environ.get("W4_SMOKE_MODEL", args.model)}
    log = Path(args.out_dir) / "w4_local_stack.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        spy = None
        try:
            _wait_models(target, 300, proc)
            if args.profile:  # attached after loading: only serving is sampled
                fmt = "raw" if args.profile.endswith(".txt") else "flamegraph"
                native = ["--native"] if os.environ.get("W4_SPY_NATIVE") else []
                spy_bin = str(Path(sys.executable).with_name("py-spy"))
                spy = subprocess.Popen([spy_bin, "record", "-r", "200", "--gil", *native, "-f", fmt,
                                        "-o", args.profile, "--pid", str(proc.pid)])
                time.sleep(1.0)
            client = subprocess.run(
                _script("client", "--target", target, "--num-requests", str(args.num_requests),
                        "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)),
                capture_output=True, text=True, env=env, timeout=600)
            if client.returncode != 0:
                raise RuntimeError(f"client failed: {client.stderr[-3000:]}")
            result = _results(client.stdout)[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            if spy is not None:
                spy.wait(timeout=120)
    server = _results(log.read_text())
    result.update(server[0] if server else {})
    if "stack_cpu_s" in result:
        result["stack_cpu_us_per_chunk"] = result["stack_cpu_s"] / result["output_chunks"] * 1e6
        result["stack_cpu_us_per_token"] = result["stack_cpu_s"] / result["output_tokens"] * 1e6
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


def drive(args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = str(write_config(args.out_dir / "configs"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    off = subprocess.run(_script("offline", "--model", model_dir), capture_output=True, text=True, env=env,
                         timeout=600)
    (args.out_dir / "w4_offline.log").write_text(off.stdout + off.stderr)
    offline = _results(off.stdout)[0]
    print(f"offline: {offline}", flush=True)
    card = offline.pop("card")
    port = _free_port()
    worker_cmd = [sys.executable, "-m", "gpu_worker", "--model", model_dir, "--host", "127.0.0.1",
                  "--port", str(port), "--drain-grace-s", "1", "--log-level", "WARNING",
                  *[f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items() if not isinstance(v, bool)],
                  "--no-enable-prefix-caching", _core_flag(args.engine_core_process)]
    direct, _ = _serve_and_measure(worker_cmd, f"127.0.0.1:{port}", args.out_dir / "w4_worker.log")
    print(f"grpc_worker: {direct}", flush=True)
    paths = [("offline_llm", offline), ("grpc_worker", direct)]
    for hop in dict.fromkeys(args.stack_hops):
        router_port, worker_port = _free_port(), _free_port()
        stack_cmd = _script("stack", "--model", model_dir, "--router-port", str(router_port),
                            "--worker-port", str(worker_port), _core_flag(args.engine_core_process),
                            "--worker-hop", hop)
        routed, server = _serve_and_measure(stack_cmd, f"127.0.0.1:{router_port}",
                                            args.out_dir / f"w4_stack_{hop}.log")
        routed.update(server[0] if server else {})
        routed.setdefault("worker_hop", hop)
        print(f"{STACK_ENGINES[hop]}: {routed}", flush=True)
        paths.append((STACK_ENGINES[hop], routed))
    redis_bin = _redis_server()
    if redis_bin is not None:
        procs = _router_worker_procs(redis_bin, worker_cmd, args.out_dir)
        split, _ = _serve_and_measure(*procs)
        print(f"grpc_router_worker_procs: {split}", flush=True)
        paths.append(("grpc_router_worker_procs", split))
    else:
        print("no redis-server (W4_REDIS_SERVER or PATH): the separate-process path is skipped", flush=True)
    run_id, rows = new_run_id(), []
    base = offline["output_tok_s"]
    for engine, res in paths:
        extra = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items() if k != "output_tok_s"}
        if engine != "offline_llm":
            extra["cost_vs_offline"] = round(1 - res["output_tok_s"] / base, 4)
        tok_s = res["output_tok_s"]
        if engine != "offline_llm":
            extra["engine_core_process"] = args.engine_core_process
        if args.note:
            extra["note"] = args.note
        rows.append(ResultRow(run_id, today(), args.commit, card, "W4", SHAPE, engine, tok_s, extra))
    append_results(args.results, rows)
    print(markdown(rows))


def _router_worker_procs(
    redis_bin: str, worker_cmd: list[str], out_dir: Path
) -> tuple[list[str], str, Path, list[tuple[list[str], Path]]]:
    """The deployed layout: Redis, a worker process registered in it, a router process that
    finds the worker there. Returns ``_serve_and_measure``'s arguments (router last)."""
    redis_port, worker_port, router_port = _free_port(), _free_port(), _free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_cmd = [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"]
    port_at = worker_cmd.index("--port") + 1
    worker = [*worker_cmd[:port_at], str(worker_port), *worker_cmd[port_at + 1:],
              "--redis-url", redis_url, "--advertise-address", f"127.0.0.1:{worker_port}"]
    router = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(router_port),
              "--redis-url", redis_url, "--drain-grace-s", "1", "--log-level", "WARNING"]
    before = [(redis_cmd, out_dir / "w4_redis.log"), (worker, out_dir / "w4_split_worker.log")]
    return router, f"127.0.0.1:{router_port}", out_dir / "w4_split_router.log", before


def markdown(rows: list[ResultRow]) -> str:
    out = ["| path | output tok/s | cost vs offline | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
           "| tokens/chunk |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        e = r.extra
        cost = e.get("cost_vs_offline")
        verdict = "" if cost is None else f"{cost:.1%} ({'met' if cost <= TARGET_COST else 'MISSED'})"
        lat = ("", "") if "ttft_p50_ms" not in e else (
            f"{e['ttft_p50_ms']:,.0f} / {e['ttft_p99_ms']:,.0f}",
            f"{e['itl_p50_ms']:.1f} / {e['itl_p99_ms']:.1f}")
        out.append(f"| {r.engine} | {r.output_tok_s:,.0f} | {verdict} | {lat[0]} | {lat[1]} "
                   f"| {e.get('tokens_per_chunk', '')} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
