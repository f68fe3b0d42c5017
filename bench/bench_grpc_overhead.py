"""Does serving over gRPC stall the engine loop? Same workload, offline API vs 64 gRPC streams.

Runs N requests (fixed prompt length, greedy, ignore_eos, fixed max_tokens) twice in one run
of this script:

1. offline: ``gpu_worker.LLM(...).generate(prompts, params)`` in this process;
2. gRPC: a worker process (``python -m gpu_worker``) on loopback, and N concurrent
   ``Generate`` streams from this process (``llmserve.client.AsyncClient``).

Prints the output tokens per second of each and their ratio (gRPC / offline), and with
``--markdown FILE`` appends a result row to that file. The engine is the same
(``AsyncLLM`` runs the core on its own thread); a ratio near 1 means gRPC, tokenization
and detokenization on the event loop do not slow the core loop.

    python bench/bench_grpc_overhead.py --model smollm2-135m --num-requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass(frozen=True)
class Result:
    name: str
    output_tokens: int
    seconds: float

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token-id prompts (ids 100..vocab-1), identical for both runs."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def run_offline(args: argparse.Namespace, prompts: list[list[int]]) -> Result:
    from gpu_worker import LLM, SamplingParams

    llm = LLM(model=args.model, **engine_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == len(prompts) * args.max_tokens, tokens
    return Result("offline LLM.generate", tokens, seconds)


def engine_args(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"max_num_seqs": max(args.num_requests, 1)}
    if args.num_kv_blocks:
        out["num_kv_blocks"] = args.num_kv_blocks
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "gpu_worker",
        "--model",
        args.model,
        "--served-model-name",
        "bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "WARNING",
    ]
    for key, value in engine_args(args).items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    proc = subprocess.Popen(cmd)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("worker did not become SERVING")


async def run_grpc(args: argparse.Namespace, prompts: list[list[int]], target: str) -> Result:
    from llmserve.client import AsyncClient

    sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
    async with AsyncClient(target) as client:
        await client.complete("bench", prompt_token_ids=prompts[0], max_tokens=4, temperature=0.0)  # warm-up

        async def one(ids: list[int]) -> int:
            tokens = 0
            async for chunk in client.generate("bench", prompt_token_ids=ids, **sampling):
                tokens += len(chunk.token_ids)
            return tokens

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - start
    assert all(c == args.max_tokens for c in counts), counts
    return Result(f"gRPC, {len(prompts)} concurrent streams", sum(counts), seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152, help="prompt ids are drawn below this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", choices=["offline-first", "grpc-first"], default="offline-first")
    parser.add_argument("--markdown", default=None, help="append a result row to this file")
    args = parser.parse_args(argv)

    prompts = make_prompts(args.num_requests, args.prompt_len, args.vocab, args.seed)
    results: dict[str, Result] = {}
    steps = ["offline", "grpc"] if args.order == "offline-first" else ["grpc", "offline"]
    for step in steps:
        if step == "offline":
            results[step] = run_offline(args, prompts)
        else:
            port = free_port()
            proc = start_worker(args, port)
            try:
                results[step] = asyncio.run(run_grpc(args, prompts, f"127.0.0.1:{port}"))
            finally:
                proc.terminate()
                proc.wait(60)
        r = results[step]
        print(
            f"{r.name:32s} {r.output_tokens:6d} tokens in {r.seconds:7.2f} s = {r.tok_per_s:8.1f} tok/s",
            flush=True,
        )
    ratio = results["grpc"].tok_per_s / results["offline"].tok_per_s
    print(f"ratio gRPC / offline = {ratio:.3f}")
    if args.markdown:
        row = (
            f"| {args.model} | {platform.machine()} {os.cpu_count()} CPUs | {args.num_requests} | "
            f"{args.prompt_len} | {args.max_tokens} | {results['offline'].tok_per_s:.1f} | "
            f"{results['grpc'].tok_per_s:.1f} | {ratio:.3f} |\n"
        )
        with open(args.markdown, "a") as f:
            f.write(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
