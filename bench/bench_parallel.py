"""Tensor / pipeline parallel scaling: W1 and W2 with TP=1, 2, 4 and PP=2 on one host, same run.

    PYTHONPATH=. python bench/bench_parallel.py --commit $(git rev-parse --short HEAD) \\
        [--shapes llama3-8b,llama3-70b] [--configs 1x1,2x1,4x1,1x2,2x2] [--workloads W1,W2]

Each configuration (``TPxPP``) serves the shape with random bf16 weights through the public
offline API (``LLM(..., tensor_parallel_size=TP, pipeline_parallel_size=PP)``); configurations
needing more GPUs than are visible, or more memory than they have (llama3-70b on TP=1), are
reported as skipped with the reason. In the same run the script measures the NCCL all-reduce
on the visible GPUs (bus bandwidth at 256 MiB, latency at the message sizes of a decode step) and
estimates the share of a decode step spent in communication: 2 all-reduces per layer (attention
output and MLP output) of ``batch x hidden`` bf16 values, at the measured latency, over the
measured decode step time. Rows go to ``docs/benchmarks/results.jsonl`` with
``tensor_parallel_size`` / ``pipeline_parallel_size``; ratios to TP=1 are printed.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0), also in the processes the engine spawns.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import SHAPES, prompts_for, write_config  # noqa: E402  (the W1-W3 bench's shapes and inputs)
from results import (  # noqa: E402
    DEFAULT_GPU_PRICE_PER_HOUR_USD,
    ResultRow,
    append_results,
    cost_per_million_output_tokens,
    new_run_id,
    today,
)

WORKLOADS = {"W1": (256, 512, 256), "W2": (1, 32, 128)}  # requests, prompt tokens, output tokens


def run_engine(model_dir: Path, tp: int, pp: int, workloads: list[str]) -> dict[str, dict[str, float]]:
    """W1 / W2 through the offline API on one configuration: tok/s and the decode step time."""
    from gpu_worker import LLM, SamplingParams

    out: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    with LLM(model=str(model_dir), load_format="dummy", max_model_len=2048, tensor_parallel_size=tp,
             pipeline_parallel_size=pp) as llm:
        load_s = time.perf_counter() - t0
        for w in workloads:
            n, p_len, o_len = WORKLOADS[w]
            params = SamplingParams(temperature=0.0, max_tokens=o_len, ignore_eos=True)
            llm.generate(prompts_for(min(n, 8), p_len, 99), params)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            outs = llm.generate(prompts_for(n, p_len, 1), params)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            out[w] = dict(output_tok_s=tokens / elapsed, elapsed_s=elapsed, load_s=load_s,
                          decode_step_ms=1e3 * elapsed / o_len if w == "W2" else float("nan"),
                          num_kv_blocks=float(llm.engine.core.num_kv_blocks))
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _all_reduce_worker(rank: int, world: int, port: int, sizes: list[int], results: Any) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    timings = {}
    for size in sizes:
        x = torch.randn(size // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(5):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        reps = 20 if size > 1 << 24 else 200
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        timings[size] = (time.perf_counter() - start) / reps
    if rank == 0:
        results.update(timings)
    dist.destroy_process_group()


def measure_all_reduce(world: int, sizes: list[int]) -> dict[int, float]:
    """Seconds per bf16 all-reduce of each size (bytes) over ``world`` GPUs."""
    from gpu_worker.distributed.launch import free_port

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_all_reduce_worker, args=(world, free_port(), sizes, results), nprocs=world, join=True)
    return dict(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--configs", default="1x1,2x1,4x1,1x2,2x2")
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    ap.add_argument("--results", type=Path, default=Path("docs/benchmarks/results.jsonl"))
    ap.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_GPU_PRICE_PER_HOUR_USD,
                    help="USD per GPU-hour for cost_per_million_output_tokens_usd (all TP x PP GPUs of a "
                    "row)")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    card = f"{torch.cuda.get_device_name()} x{gpus}"
    run_id, rows = new_run_id(), []
    workloads = args.workloads.split(",")
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    comm: dict[int, dict[int, float]] = {}
    for world in sorted({tp for tp, _ in configs if 1 < tp <= gpus}):
        comm[world] = measure_all_reduce(world, [8 * 1024, 2 * 1024 * 1024, 256 * 1024 * 1024])
        big = comm[world][256 * 1024 * 1024]
        bus = 2 * (world - 1) / world * 256 * 1024 * 1024 / big / 1e9
        small, mid = comm[world][8 * 1024] * 1e6, comm[world][2 * 1024 * 1024] * 1e6
        print(f"all-reduce over {world} GPUs: {bus:,.0f} GB/s bus bandwidth at 256 MiB; "
              f"{small:.1f} us at 8 KiB, {mid:.1f} us at 2 MiB", flush=True)
        extra = {"bus_GBps_256MiB": round(bus, 1), "us_8KiB": round(small, 2), "us_2MiB": round(mid, 2)}
        rows.append(ResultRow(run_id, today(), args.commit, card, "allreduce", "-", "nccl", 0.0, extra,
                              tensor_parallel_size=world))
    base: dict[tuple[str, str], float] = {}
    for shape in args.shapes.split(","):
        model_dir = write_config(shape, args.out_dir / "configs")
        for tp, pp in configs:
            if tp * pp > gpus:
                print(f"{shape} TP={tp} PP={pp}: skipped ({tp * pp} GPUs needed, {gpus} visible)", flush=True)
                continue
            try:
                res = run_engine(model_dir, tp, pp, workloads)
            except (torch.cuda.OutOfMemoryError, ValueError, RuntimeError) as exc:
                print(f"{shape} TP={tp} PP={pp}: failed: {exc!r}"[:300], flush=True)
                continue
            for w, r in res.items():
                key = (shape, w)
                if (tp, pp) == (1, 1):
                    base[key] = r["output_tok_s"]
                ratio = r["output_tok_s"] / base[key] if key in base else float("nan")
                extra: dict[str, Any] = {k: round(v, 4) for k, v in r.items() if v == v}
                extra["vs_tp1"] = round(ratio, 3) if ratio == ratio else None
                if w == "W2" and tp in comm:  # batch 1: 2 all-reduces per layer of hidden x 2 bytes
                    layers = SHAPES[shape]["num_hidden_layers"] // pp
                    comm_ms = 2 * layers * comm[tp][8 * 1024] * 1e3
                    extra["comm_share_of_decode_step_est"] = round(comm_ms / r["decode_step_ms"], 3)
                tok_s = r["output_tok_s"]
                cost = cost_per_million_output_tokens(args.price_per_gpu_hour, tp * pp, tok_s)
                extra["gpu_price_per_hour_usd"] = args.price_per_gpu_hour
                extra["cost_per_million_output_tokens_usd"] = None if cost is None else round(cost, 4)
                print(f"{shape} {w} TP={tp} PP={pp}: {tok_s:,.0f} tok/s ({ratio:.2f}x TP=1) {extra}",
                      flush=True)
                rows.append(ResultRow(run_id, today(), args.commit, card, w, shape, "llmserve", tok_s, extra,
                                      tensor_parallel_size=tp, pipeline_parallel_size=pp))
    append_results(args.results, rows)


if __name__ == "__main__":
    main()
