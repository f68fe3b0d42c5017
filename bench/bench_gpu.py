"""GPU benchmarks W1-W3 (shared/BASELINES.md): our engine vs HF transformers, same process, same card.

    PYTHONPATH=. python bench/bench_gpu.py --commit $(git rev-parse HEAD) \\
        [--workloads W1,W2,W3] [--engines ours,ours_sync,hf,hf_batch] [--out-dir DIR]

``--suite quantization`` runs issue 13's comparison instead (bf16 vs fp8 weights, fp8 KV cache,
W4A16, and W5: llama3-70b in fp8 on one card; ``bench_gpu_quant.py``).

Models have random bf16 weights in the shapes of llama3-8b / llama3-1b (configs written here,
``load_format="dummy"``). Our engine runs as its engine core (scheduler + KV cache manager +
model runner, the KV pool sized from ``gpu_memory_utilization`` by profiling): it excludes
detokenization, like HF's token-id outputs. HF ``generate`` runs static batches, timed on its
second call at the timed shape (its first, recorded as ``first_call_tok_s``, runs at a quarter
to a half of that: DECISIONS 157); with ``--hf-batches-timed k`` only ``k`` batches of each size
are timed (throughput of one full batch is what a static batch of that size gives over the
whole workload). Our engine core freezes its startup objects out of the cyclic GC after its
warm-up, as the servers do (``--gc-freeze``); every timed run records the collector's pauses. HF
``generate_batch`` runs on ``--gen-batch-requests`` of W1's requests (its own warm-up
included, as in BASELINES.md). Prints a table, appends JSON lines and writes a Markdown report.

Profiles (our engine, W1/W3): ``--profile`` (six full-batch decode steps), ``--profile-prefill``
(the prompts' steps), ``--host-profile`` (the host's parts of a step, and a cProfile). Kernel time
per step counts the device's own events only (``kernel_us``). W1/W3 rows carry the host's speed at
the engine core's Python (``host_sched_update_ms``, :func:`host_speed_ms`), measured before the run,
and W1-W3 rows what the card's clock and power did during it (``gpu_clocks.ClockSampler``:
``sm_clock_mhz_median`` / ``_min``, ``power_w_max``, ``power_capped_share``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_worker.config import OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS
from kernels.triton_ops import decode_attention, gemv, pdl, rotary_kv, wna16

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu_report as report  # noqa: E402
import trace_gaps  # noqa: E402
from gc_pauses import GcPauses  # noqa: E402
from gpu_clocks import ClockSampler, smi_device_id  # noqa: E402
from results import (  # noqa: E402
    DEFAULT_GPU_PRICE_PER_HOUR_USD,
    ResultRow,
    append_results,
    cost_per_million_output_tokens,
    new_run_id,
    today,
)

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128),
}
WORKLOADS = {  # name -> (shape, requests, prompt tokens, output tokens)
    "W1": ("llama3-8b", 256, 512, 256),
    "W2": ("llama3-8b", 1, 32, 128),
    "W3": ("llama3-1b", 256, 512, 256),
}
MAX_MODEL_LEN = 2048


def write_config(
    shape: str, root: Path, extra: dict[str, Any] | None = None, name: str | None = None
) -> Path:
    """``root/<name or shape>/config.json`` of a Llama of ``shape`` (random weights), with
    ``extra`` keys (a ``quantization_config``, say) added."""
    folder = root / (name or shape)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001, **SHAPES[shape], **(extra or {}),
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def prompts_for(n: int, length: int, seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, 128000, size=(n, length)).tolist()


# ----------------------------------------------------------------------------- our engine


# The step token budget of our engine core in these benches: the offline LLM's default on an
# H100 / H200-class card (DECISIONS 130; 8192 before); --max-num-batched-tokens replaces it.
STEP_TOKEN_BUDGET = OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS
# offline_tuned's budget: the W1 setting an independent run found best before the device defaults.
TUNED_TOKEN_BUDGET = 8192


class OurEngine:
    """The engine core as the worker runs it (scheduler + KV cache manager + model runner, the
    KV pool sized by profiling), without tokenizer or detokenizer, like HF's token-id outputs.
    ``gc_freeze``: startup's objects frozen once the engine is warm, as the serving entry points
    do (``llmserve.gc_tuning``; DECISIONS 157), and handed back at :meth:`close`."""

    def __init__(self, model_dir: Path, max_num_seqs: int = 256, enforce_eager: bool = False,
                 async_scheduling: bool = True, max_num_batched_tokens: int = STEP_TOKEN_BUDGET,
                 gc_freeze: bool = True, **engine_args: Any) -> None:
        from gpu_worker.config import EngineConfig
        from gpu_worker.engine.core import EngineCore

        t0 = time.perf_counter()
        config = EngineConfig(model=str(model_dir), load_format="dummy", max_model_len=MAX_MODEL_LEN,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              gpu_memory_utilization=0.9, enable_prefix_caching=False,
                              enforce_eager=enforce_eager, skip_tokenizer_init=True,
                              async_scheduling=async_scheduling, **engine_args)
        self.core = EngineCore(config, kv_events=False)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_blocks = self.core.num_kv_blocks
        t1 = time.perf_counter()
        self.core.warmup()  # includes CUDA graph capture
        torch.cuda.synchronize()
        self.load_s, self.warmup_s = t1 - t0, time.perf_counter() - t1
        self._ids = 0
        self.gc_frozen = gc_freeze
        if gc_freeze:
            from llmserve.gc_tuning import freeze_startup_objects

            freeze_startup_objects()

    def run(self, prompts: list[list[int]], max_tokens: int,
            on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """All prompts submitted at once, run to completion. Returns timings per step."""
        from gpu_worker.core.types import EngineCoreRequest
        from gpu_worker.sampling_params import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t_start = time.perf_counter()
        for p in prompts:
            self._ids += 1
            self.core.add_requests([EngineCoreRequest(f"b{self._ids}", tuple(p), params)])
        first: list[float] = []
        steps: list[tuple[int, float]] = []  # (requests that got a token, step end)
        n_out = 0
        while self.core.has_unfinished():
            if on_step is not None:
                on_step(len(steps))
            outputs = self.core.step()
            if outputs and not first:
                first.append(time.perf_counter())
            n_out += sum(len(o.new_token_ids) for o in outputs)
            steps.append((len(outputs), time.perf_counter()))
        elapsed = time.perf_counter() - t_start
        return dict(elapsed_s=elapsed, output_tokens=n_out, steps=steps, t_start=t_start,
                    ttft_s=(first[0] - t_start) if first else None)

    def close(self) -> None:
        if self.gc_frozen:
            from llmserve.gc_tuning import unfreeze_objects

            unfreeze_objects()
        if self.core.runner.graphs is not None:
            self.core.runner.graphs.clear()
        del self.core
        gc.collect()
        torch.cuda.empty_cache()


def _prompt_steps(engine: OurEngine, prompts: list[list[int]]) -> int:
    """Steps the prompts take at the engine's step token budget."""
    return -(-len(prompts) * len(prompts[0]) // engine.max_num_batched_tokens)


def warm_up(engine: OurEngine, workload: str) -> None:
    """Run ``workload``'s shape once before its timed run: W2 its own request; W1/W3 all of its
    prompts (another seed) for 24 tokens, so every request is still running when the last chunk
    is prefilled (24 > the 17 prefill steps at a budget of 8,192 tokens; more tokens at smaller
    budgets) and the timed run's mixed steps find their kernel variants compiled. Without it a
    first W1 run carried a 0.36-0.87 s compile in one step (bf16 and fp8 KV alike, H200,
    2026-12-03)."""
    _, n, p_len, o_len = WORKLOADS[workload]
    if workload == "W2":
        engine.run(prompts_for(1, p_len, 99), o_len)
    else:
        prompts = prompts_for(n, p_len, 98)
        engine.run(prompts, max(24, _prompt_steps(engine, prompts) + 8))


def decode_step_stats(res: dict[str, Any], num_seqs: int) -> dict[str, float]:
    """Wall time of the decode steps with a full batch (a token for every request), of the
    slowest step of the run (a kernel compiling inside the timed run shows there), and from the
    start to the first full-batch step (``prefill_phase_s``: the prompts' steps)."""
    times = []
    prev = res["t_start"]
    first_full = None
    for num_outputs, end in res["steps"]:
        if num_outputs == num_seqs:
            times.append(end - prev)
            if first_full is None:
                first_full = prev - res["t_start"]
        prev = end
    if not times:
        return {}
    ends = [res["t_start"]] + [end for _, end in res["steps"]]
    slowest = max(b - a for a, b in zip(ends, ends[1:], strict=False))
    return dict(decode_steps=len(times), decode_step_ms=1e3 * float(np.median(times)),
                decode_step_mean_ms=round(1e3 * float(np.mean(times)), 4),
                decode_step_p90_ms=round(1e3 * float(np.percentile(times, 90)), 4),
                slowest_step_ms=round(1e3 * slowest, 1), prefill_phase_s=round(first_full or 0.0, 4))


def latency_runs(engine: Any, p_len: int, o_len: int,
                 runs: int) -> tuple[dict[str, Any], float, list[float]]:
    """W2 timed ``runs`` times in this process (the same request, prefix caching off, so each run
    computes its prompt): the run of median TPOT (the upper one of an even count), its TPOT in
    seconds, and every run's TPOT in ms, in run order. One run of 128 tokens is about a quarter
    of a second; repeating it tells a slow run from a slow process (two levels 6% apart on one
    H100, docs/BENCHMARKS.md)."""
    timed = []
    for _ in range(max(1, runs)):
        res = engine.run(prompts_for(1, p_len, 2), o_len)
        timed.append(((res["elapsed_s"] - res["ttft_s"]) / (o_len - 1), res))
    tpot, res = sorted(timed, key=lambda run: run[0])[len(timed) // 2]
    return res, tpot, [round(t * 1e3, 4) for t, _ in timed]


def latency_step_stats(res: dict[str, Any]) -> dict[str, float]:
    """W2's token gaps: the time between consecutive steps that returned a token after the first
    (one request, so each is one output token's time). Their median (``decode_step_ms``), the
    slowest (``slowest_gap_ms``), and the gaps over twice the median (``stalls``) with the time
    they took beyond it (``stall_ms``): a run's TPOT (its mean gap) that is above the median by
    ``stall_ms / gaps`` lost its time in a few stalls, not in every step."""
    ends = [end for k, end in res["steps"] if k]
    gaps = np.diff(np.asarray(ends, dtype=np.float64)) * 1e3
    if gaps.size == 0:
        return {}
    median = float(np.median(gaps))
    over = gaps[gaps > 2 * median]
    return dict(decode_step_ms=round(median, 4), slowest_gap_ms=round(float(gaps.max()), 3),
                stalls=int(over.size), stall_ms=round(float((over - median).sum()), 3))


def graph_step_ms(engine: Any, replays: int = 100, rounds: int = 5) -> dict[str, float]:
    """The device's own time for one batch-1 decode step: the captured one-token decode graph
    (the model and the LM head, as a graphed step launches them) replayed ``replays`` times back
    to back between CUDA events, ``rounds`` times; the median round per replay
    (``graph_step_ms``; :func:`host_gap` sets the token gap against it). Run after W2's timed
    runs, with nothing running: the graph rewrites the last step's KV slot of a finished request.
    Empty without CUDA graphs (``--eager``, CPU)."""
    graphs = getattr(engine.core.runner, "graphs", None)
    size = graphs.bucket_for(1) if graphs is not None else None
    if size is None:
        return {}
    per = []
    for _ in range(max(1, rounds)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graphs.replay(size)
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) / replays)
    return {"graph_step_ms": round(float(np.median(per)), 4)}


def host_gap(stats: dict[str, float]) -> dict[str, float]:
    """``host_gap_ms``: W2's median token gap (``decode_step_ms``) less the graph's device time
    (``graph_step_ms``), where both were measured; else nothing."""
    if "graph_step_ms" not in stats or "decode_step_ms" not in stats:
        return {}
    return {"host_gap_ms": round(stats["decode_step_ms"] - stats["graph_step_ms"], 4)}


def w2_step_fields(engine: Any, res: dict[str, Any]) -> dict[str, float]:
    """A W2 row's step fields: :func:`latency_step_stats` of its median run, the graph's device
    time (:func:`graph_step_ms`) and the gap between the two (:func:`host_gap`)."""
    stats = {**latency_step_stats(res), **graph_step_ms(engine)}
    return {**stats, **host_gap(stats)}


def host_speed_ms() -> float:
    """This host's speed at the engine core's own Python: ``schedule`` + ``update`` medians (ms)
    of a W1/W3-shaped decode step (256 requests, 512-token prompts; ``bench_host_step.py``'s
    part 1, 40 steps, no GPU work), measured just before a W1/W3 run. W3's decode is bound by
    the host on slower hosts, so its rows carry the host's speed beside the result."""
    from bench_host_step import scheduler_step_ms

    sched_ms, update_ms = scheduler_step_ms(256, 512, 40)
    return round(sched_ms + update_ms, 3)


def kernel_us(events: Any) -> float:
    """Microseconds on the device in a profiler's ``key_averages()``: the device's own events
    (kernels, copies, memsets) only. An operator whose kernel the profiler also lists (``aten::mm``,
    ``aten::argmax``) carries the same time as its own device time, so summing every row counts
    such kernels twice (about 10% of a W3 decode step, 2x for eager prompt steps)."""
    from torch.autograd import DeviceType

    return float(sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA))


def _profiled_run(engine: OurEngine, prompts: list[list[int]], first: int, stop: int,
                  max_tokens: int, trace: Path | None = None) -> tuple[Any, float]:
    """Run ``prompts`` under torch.profiler from engine step ``first`` to step ``stop`` (the
    device drained at both ends); returns the profiler's ``key_averages()`` and the wall time.
    With ``trace``, the Chrome trace is written there too."""
    from torch.profiler import ProfilerActivity, profile

    state: dict[str, float] = {}
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def on_step(i: int) -> None:
        if i == first:
            torch.cuda.synchronize()
            prof.start()
            state["t0"] = time.perf_counter()
        elif i == stop:
            torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - state["t0"]
            prof.stop()

    engine.run(prompts, max_tokens=max_tokens, on_step=on_step)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return prof.key_averages(), state["wall"]


def profile_decode(engine: OurEngine, prompts: list[list[int]], out_dir: Path, tag: str,
                   first: int = 24) -> dict[str, float]:
    """torch.profiler over 6 full-batch decode steps: wall time vs GPU kernel time per step, and
    the device's idle time per step by kind (``trace_gaps``), all in ``profile_<tag>.txt``. The
    profiled steps follow engine step ``first`` (24 by default: the pipeline refilled after the
    drain at its start); their host-late gaps include the profiler's own host overhead."""
    assert _prompt_steps(engine, prompts) < first, "profiled steps must be decode steps"
    trace = out_dir / f"trace_{tag}.json"
    events, wall = _profiled_run(engine, prompts, first, first + 6, max_tokens=first + 16, trace=trace)
    table = events.table(sort_by="self_device_time_total", row_limit=25)
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    gaps = trace_gaps.gap_report(trace_gaps.load_trace(trace))
    (out_dir / f"profile_{tag}.txt").write_text(f"{table}\n{cpu_table}\n{gaps.text(6)}")
    stats = dict(profiled_step_ms=1e3 * wall / 6, gpu_kernel_ms_per_step=kernel_us(events) / 1e3 / 6)
    stats.update({f"trace_{k}": v for k, v in gaps.per_step(6).items()})
    return stats


def profile_prefill(engine: OurEngine, prompts: list[list[int]], out_dir: Path, tag: str) -> dict[str, float]:
    """torch.profiler over the prompts' steps of a W1/W3-shaped run (every step before the first
    full-batch decode): wall time vs GPU kernel time per step, the kernels by GPU time and the
    device's idle time by kind (``trace_gaps``)."""
    steps = _prompt_steps(engine, prompts)
    trace = out_dir / f"trace_prefill_{tag}.json"
    events, wall = _profiled_run(engine, prompts, 0, steps, max_tokens=steps + 8, trace=trace)
    table = events.table(sort_by="self_device_time_total", row_limit=30)
    gaps = trace_gaps.gap_report(trace_gaps.load_trace(trace))
    (out_dir / f"profile_prefill_{tag}.txt").write_text(f"{table}\n{gaps.text(steps)}")
    stats = dict(prefill_profiled_steps=steps, prefill_step_ms=1e3 * wall / steps,
                 prefill_gpu_kernel_ms_per_step=kernel_us(events) / 1e3 / steps)
    stats.update({f"prefill_trace_{k}": v for k, v in gaps.per_step(steps).items()})
    return stats


def _timed(obj: Any, name: str, times: dict[str, list[float]]) -> None:
    """Wrap ``obj.name`` (an instance attribute shadowing the method) to record its wall time."""
    fn = getattr(obj, name)
    times[name] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name].append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def host_profile(engine: OurEngine, prompts: list[list[int]], out_dir: Path, tag: str) -> dict[str, float]:
    """The host side of a W1/W3-shaped run, after the timed run, in two untimed 64-token runs:
    (1) the wall time of each part of an engine step (schedule, launch, update; inside the
    launch the runner's state update, input preparation, graph replay and sampling, and inside
    that the LM head, the sampler and the start of the ids' copy; the rest, mostly the wait for
    the sampled ids), medians over the run's last 32 steps (all decode), returned; (2) a
    cProfile (functions by own and by cumulative time) in ``host_profile_<tag>.txt``: it slows
    the host, so its shares matter, not its times."""
    import cProfile
    import io
    import pstats

    core = engine.core
    times: dict[str, list[float]] = {}
    runner = core.runner
    wrapped = [(core.scheduler, "schedule"), (core.scheduler, "update"), (core.executor, "execute_async"),
               (runner, "_sample"), (runner.states, "update_batch"), (runner.inputs, "prepare"),
               (runner.model, "compute_logits"), (runner.sampler, "sample"), (runner, "_pending_output")]
    if runner.graphs is not None:
        wrapped.append((runner.graphs, "replay"))
    for obj, name in wrapped:
        _timed(obj, name, times)
    res = engine.run(prompts, max_tokens=64)
    for obj, name in wrapped:
        delattr(obj, name)  # the instance attribute goes; the class's method shows again
    ends = [res["t_start"]] + [end for _, end in res["steps"]]
    parts = {f"host_{k}_ms": 1e3 * float(np.median(v[-32:])) for k, v in times.items() if v}
    parts["host_step_wall_ms"] = 1e3 * float(np.median(np.diff(ends)[-32:]))
    # The rest of a step's wall time: mostly the wait for the oldest step's sampled ids.
    parts["host_rest_ms"] = parts["host_step_wall_ms"] - sum(
        parts.get(f"host_{k}_ms", 0.0) for k in ("schedule", "update", "execute_async"))
    prof = cProfile.Profile()
    prof.enable()
    engine.run(prompts, max_tokens=64)
    prof.disable()
    text = io.StringIO()
    text.write(f"step parts (medians of the last 32 steps, no profiler): {parts}\n\n")
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    (out_dir / f"host_profile_{tag}.txt").write_text(text.getvalue())
    return parts


# ----------------------------------------------------------------------------- HF transformers


def hf_model(model_dir: Path) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def hf_static(
    model: Any, prompts: list[list[int]], batch: int, max_tokens: int, timed: int
) -> dict[str, Any]:
    """HF ``generate`` over static batches of ``batch`` prompts, ``timed`` of them, twice: the first
    pass is HF's first call at this shape (``first_elapsed_s``), the second the timed figure: a
    serving process is past its first batch, and our engine is timed after a warm-up at the full
    shape. (The first call's cost was not profiled; HF's cache grows by concatenation every step,
    so the caching allocator's pool growing during the first run is the likely part.) On an H100
    (2026-12-06) W1's b256 batch ran 2,159 tok/s on its first call and 4,762 / 4,840 on the next
    two (DECISIONS 157)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    ids = torch.tensor(prompts, device="cuda")
    batches = [ids[i : i + batch] for i in range(0, len(prompts), batch)][:timed]

    def run() -> tuple[float, int]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n_out = 0
        for b in batches:
            out = model.generate(b, attention_mask=torch.ones_like(b), generation_config=gen)
            n_out += (out.shape[1] - b.shape[1]) * b.shape[0]
        torch.cuda.synchronize()
        return time.perf_counter() - t0, n_out

    with torch.inference_mode():
        first, _ = run()
        elapsed, n_out = run()
    return dict(elapsed_s=elapsed, output_tokens=n_out, first_elapsed_s=first, batches_timed=len(batches),
                batches_total=-(-len(prompts) // batch))


def hf_generate_batch(model: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    t0 = time.perf_counter()
    with torch.no_grad():  # not inference_mode: generate_batch updates its own buffers in place
        outs = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.generated_tokens) for o in outs.values())
    return dict(elapsed_s=elapsed, output_tokens=n_out)


# ----------------------------------------------------------------------------- driver


@dataclass
class Ctx:
    args: argparse.Namespace
    card: str
    ceilings: dict[str, float]
    run_id: str
    rows: list[ResultRow]
    out_dir: Path

    def add(self, workload: str, shape: str, engine: str, tok_s: float, **extra: Any) -> None:
        price = self.args.price_per_gpu_hour  # one GPU per row here
        cost = cost_per_million_output_tokens(price, 1, tok_s)
        extra.update(gpu_price_per_hour_usd=price,
                     cost_per_million_output_tokens_usd=None if cost is None else round(cost, 4),
                     early_reads=early_reads(), pdl_trigger=pdl_trigger(), qkv_rope=qkv_rope())
        self.rows.append(ResultRow(self.run_id, today(), self.args.commit, self.card, workload, shape,
                                   engine, tok_s, {k: v for k, v in extra.items() if v is not None}))
        print(f"  {workload} {shape} {engine}: {tok_s:,.0f} tok/s {extra}", flush=True)


def bench_ours(
    ctx: Ctx, shape: str, model_dir: Path, workloads: list[str], async_scheduling: bool = True
) -> None:
    """Our engine core; ``llmserve`` rows with async scheduling (the CUDA default), else ``llmserve_sync``."""
    extra_args = {}
    if ctx.args.mixed_graph_max_tokens is not None:
        extra_args["mixed_graph_max_tokens"] = ctx.args.mixed_graph_max_tokens
    engine = OurEngine(model_dir, enforce_eager=ctx.args.eager, async_scheduling=async_scheduling,
                       max_num_batched_tokens=ctx.args.max_num_batched_tokens,
                       gc_freeze=ctx.args.gc_freeze == "on", **extra_args)
    name = "llmserve" if async_scheduling else "llmserve_sync"
    cfg = report.shape_numbers(SHAPES[shape])
    smi = smi_device_id(torch.cuda.current_device())  # the card whose clocks the rows record
    print(f"[{name} {shape}] load {engine.load_s:.1f}s warmup+capture {engine.warmup_s:.1f}s, "
          f"{engine.num_blocks} KV blocks", flush=True)
    for w in workloads:
        _, n, p_len, o_len = WORKLOADS[w]
        warm_up(engine, w)
        if w == "W2":
            with ClockSampler(smi) as clocks, GcPauses() as pauses:
                res, tpot, tpot_runs = latency_runs(engine, p_len, o_len, ctx.args.w2_runs)
            floor = report.w2_roofline_tok_s(cfg, ctx.ceilings, p_len, o_len)
            ctx.add(w, shape, name, 1 / tpot, ttft_s=round(res["ttft_s"], 5),
                    tpot_ms=round(tpot * 1e3, 4), e2e_s=round(res["elapsed_s"], 4),
                    floor_tok_s=round(floor, 1), share_of_floor=round(1 / tpot / floor, 4), **clocks.fields(),
                    **pauses.fields(), **w2_step_fields(engine, res), tpot_runs_ms=tpot_runs)
            if ctx.args.profile:
                stats = profile_decode(engine, prompts_for(1, p_len, 3), ctx.out_dir, f"{w}_{shape}")
                print(f"  profile {w} {shape}: {stats}", flush=True)
                ctx.rows[-1].extra.update({k: round(v, 4) for k, v in stats.items()})
            continue
        prompts = prompts_for(n, p_len, 1)
        host_ms = host_speed_ms()
        with ClockSampler(smi) as clocks, GcPauses() as pauses:
            res = engine.run(prompts, o_len)
        # Every step's (requests that got a token, end in seconds from the start): where a run's
        # time went beyond the median step.
        steps = [(k, round(end - res["t_start"], 6)) for k, end in res["steps"]]
        path, again = ctx.out_dir / f"steps_{w}_{shape}_{name}.json", 1
        while path.exists():  # a workload named twice (--workloads W1,W1): one file per run
            again += 1
            path = ctx.out_dir / f"steps_{w}_{shape}_{name}_{again}.json"
        path.write_text(json.dumps(steps))
        tok_s = res["output_tokens"] / res["elapsed_s"]
        floor = report.w1_floor_tok_s(cfg, ctx.ceilings, n, p_len, o_len)
        ctx.add(w, shape, name, tok_s, elapsed_s=round(res["elapsed_s"], 3),
                ttft_s=round(res["ttft_s"], 4), floor_tok_s=round(floor, 1),
                share_of_floor=round(tok_s / floor, 4), num_kv_blocks=engine.num_blocks,
                cuda_graphs=not ctx.args.eager, max_num_batched_tokens=ctx.args.max_num_batched_tokens,
                mixed_graph_max_tokens=ctx.args.mixed_graph_max_tokens,
                host_sched_update_ms=host_ms, **decode_step_stats(res, n), **clocks.fields(),
                **pauses.fields())
        if ctx.args.profile:
            stats = profile_decode(engine, prompts, ctx.out_dir, f"{w}_{shape}", ctx.args.profile_step)
            print(f"  profile {w} {shape}: {stats}", flush=True)
            ctx.rows[-1].extra.update({k: round(v, 4) for k, v in stats.items()})
        if ctx.args.profile_prefill:
            stats = profile_prefill(engine, prompts, ctx.out_dir, f"{w}_{shape}")
            print(f"  prefill profile {w} {shape}: {stats}", flush=True)
            ctx.rows[-1].extra.update({k: round(v, 4) for k, v in stats.items()})
        if ctx.args.host_profile:
            parts = host_profile(engine, prompts, ctx.out_dir, f"{w}_{shape}")
            print(f"  host profile {w} {shape}: {parts}", flush=True)
    engine.close()


def bench_offline(ctx: Ctx, shape: str, model_dir: Path, workloads: list[str], tuned: bool) -> None:
    """The public offline API as a user calls it: ``LLM(model=...)`` with nothing else but the
    random-weights load format (``offline_defaults``), or with ``max_num_batched_tokens=8192``
    (``offline_tuned``, the setting an independent run found best before the device defaults)."""
    from gpu_worker import LLM, SamplingParams

    extra: dict[str, Any] = {"max_num_batched_tokens": TUNED_TOKEN_BUDGET} if tuned else {}
    name = "offline_tuned" if tuned else "offline_defaults"
    llm = LLM(model=str(model_dir), load_format="dummy", **extra)
    budget = llm.engine.config.max_num_batched_tokens
    cfg = report.shape_numbers(SHAPES[shape])
    for w in [w for w in workloads if w != "W2"]:
        _, n, p_len, o_len = WORKLOADS[w]
        params = SamplingParams(temperature=0.0, max_tokens=o_len, ignore_eos=True)
        llm.generate(prompts_for(8, p_len, 99), params)  # warm-up
        prompts = prompts_for(n, p_len, 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        floor = report.w1_floor_tok_s(cfg, ctx.ceilings, n, p_len, o_len)
        ctx.add(w, shape, name, tokens / elapsed, elapsed_s=round(elapsed, 3), floor_tok_s=round(floor, 1),
                share_of_floor=round(tokens / elapsed / floor, 4), max_num_batched_tokens=budget)
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def bench_hf(ctx: Ctx, shape: str, model_dir: Path, workloads: list[str], engines: list[str]) -> None:
    t0 = time.perf_counter()
    model = hf_model(model_dir)
    print(f"[hf {shape}] init {time.perf_counter() - t0:.1f}s", flush=True)
    for w in workloads:
        _, n, p_len, o_len = WORKLOADS[w]
        prompts = prompts_for(n, p_len, 1 if w != "W2" else 2)
        if "hf" in engines:
            for batch in ([1] if w == "W2" else ctx.args.hf_batches):
                res = hf_static(model, prompts, batch, o_len, ctx.args.hf_batches_timed)
                ctx.add(w, shape, f"hf_generate_static_b{batch}", res["output_tokens"] / res["elapsed_s"],  # noqa: E501
                        elapsed_s=round(res["elapsed_s"], 3), batches_timed=res["batches_timed"],
                        batches_total=res["batches_total"], warm=True,
                        first_call_tok_s=round(res["output_tokens"] / res["first_elapsed_s"], 1))
        if "hf_batch" in engines and w != "W2":
            sub = prompts[: ctx.args.gen_batch_requests]
            try:
                res = hf_generate_batch(model, sub, o_len)
                ctx.add(w, shape, "hf_generate_batch", res["output_tokens"] / res["elapsed_s"],
                        elapsed_s=round(res["elapsed_s"], 3), requests=len(sub), includes_warmup=True)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other engines
                print(f"  hf_generate_batch failed: {exc!r}", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def early_reads() -> str:
    """A decode step's reads before the PDL wait in effect (``--early-reads``), recorded on every
    row: ``"prefetch=on,rotary=on"``, the decode attention's L2 prefetch and rotary's early inputs."""
    on = {True: "on", False: "off"}
    return f"prefetch={on[decode_attention._PREFETCH]},rotary={on[rotary_kv._EARLY_INPUTS]}"


def pdl_trigger() -> str:
    """Where a PDL kernel lets the next one launch (``--pdl-trigger``), recorded on every row:
    ``"first"`` (before its wait) or ``"after"`` (after it; ``pdl.TRIGGER_FIRST``)."""
    return "first" if pdl.TRIGGER_FIRST else "after"


def qkv_rope() -> str:
    """Whether the one-token qkv GEMVs rotate and store K/V in their epilogue (``--qkv-rope``),
    recorded on every row: ``"w4=on,dense=on"``, 4-bit (``wna16.M1_ROPE``) and 16-bit / fp8
    (``gemv.DENSE_ROPE``). (Rows of 2026-12-06's first A/B say ``"on"`` / ``"off"``: 4-bit only.)"""
    on = {True: "on", False: "off"}
    return f"w4={on[wna16.M1_ROPE]},dense={on[gemv.DENSE_ROPE]}"


def w4_decode() -> str:
    """How the one-token 4-bit GEMV multiplies (``--w4-dp4a``), recorded on every quantization
    row: ``"dp4a"`` (``wna16.M1_DP4A``: 16-bit fixed-point inputs, integer dot products) or
    ``"pairs"`` (the packed bf16 decode)."""
    return "dp4a" if wna16.M1_DP4A else "pairs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--suite", choices=("w1-w3", "quantization"), default="w1-w3",
                    help="quantization: bf16 vs fp8 / fp8 KV / W4A16 and W5 (bench_gpu_quant.py), ~2.5 min")
    ap.add_argument("--quant-shapes", default="llama3-8b,llama3-70b",
                    help="--suite quantization: the shapes to run (llama3-70b includes W5 and HF's OOM); "
                    "two calls of one shape each fit a 10-minute limit")
    ap.add_argument("--quant-labels", default="",
                    help="--suite quantization: only these engines (bf16, fp8, fp8-w8a8, fp8+fp8kv, "
                         "fp8-block, w4a16, w4a16+head)")
    ap.add_argument("--w4-tiles", type=Path, default=None,
                    help="--suite quantization: the one-token 4-bit GEMV's tiling per weight shape "
                    "(wna16.M1_SHAPE_TILES; a 'packed_tiles' key: wna16.M1_PACKED_TILES, else none) from "
                    "this JSON (bench_gemv.py --w4-table); rows record it as m1_shape_tiles")
    ap.add_argument("--early-reads", choices=("on", "off"), default=None,
                    help="a decode step's reads before the PDL wait, the decode "
                    "attention's L2 prefetch and rotary's position / slot / cos-sin "
                    "(decode_attention._PREFETCH, rotary_kv._EARLY_INPUTS; default: the engine's); rows "
                    "record them as early_reads")
    ap.add_argument("--pdl-trigger", choices=("first", "after"), default=None,
                    help="where each PDL kernel lets the next one launch: before its wait or after it "
                    "(kernels/triton_ops/pdl.py TRIGGER_FIRST; default: the engine's); rows record it as "
                    "pdl_trigger")
    ap.add_argument("--qkv-rope", choices=("on", "off", "w4", "dense"), default=None,
                    help="rotary + K/V store in the one-token qkv GEMVs' epilogue: all, none, the 4-bit "
                    "one only or the 16-bit / fp8 ones only (wna16.M1_ROPE, gemv.DENSE_ROPE; default: "
                    "the engine's); rows record it as qkv_rope")
    ap.add_argument("--w4-dp4a", choices=("on", "off"), default=None,
                    help="the one-token 4-bit GEMV's integer decode (wna16.M1_DP4A; default: the engine's); "
                    "quantization rows record it as w4_decode")
    ap.add_argument("--gc-freeze", choices=("on", "off"), default="on",
                    help="our engine core's startup objects frozen out of the cyclic GC once it is warm, as "
                    "the serving entry points do (llmserve.gc_tuning); rows record the collector's pauses "
                    "during each timed run (gc_*)")
    ap.add_argument("--w2-runs", type=int, default=3,
                    help="W2's timed runs in the process (default 3): rows take the run of median TPOT "
                    "(the step statistics are that run's) and record every run's as tpot_runs_ms")
    ap.add_argument("--run-id", default="",
                    help="the rows' run_id (default: a new one; pass one to join calls)")
    ap.add_argument("--engines", default="ours,hf,hf_batch",
                    help="ours (async scheduling), ours_sync (synchronous steps), offline_defaults and "
                    "offline_tuned (the public LLM API), hf, hf_batch")
    ap.add_argument("--hf-batches", default="64,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--hf-batches-timed", type=int, default=1)
    ap.add_argument("--gen-batch-requests", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="our engine without CUDA graphs")
    ap.add_argument("--max-num-batched-tokens", type=int, default=STEP_TOKEN_BUDGET,
                    help="the token budget per step of our engine core (ours, ours_sync)")
    ap.add_argument("--mixed-graph-max-tokens", type=int, default=None,
                    help="our engine core's mixed_graph_max_tokens (default: the engine's)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler on decode steps of W1/W3")
    ap.add_argument("--profile-step", type=int, default=24,
                    help="--profile: the W1/W3 engine step after which six decode steps are profiled")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="torch.profiler on the prompts' steps of W1/W3 (profile_prefill_*.txt)")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile of a 64-token W1/W3 run after the timed one (host_profile_*.txt)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    ap.add_argument("--results", type=Path, default=Path("docs/benchmarks/results.jsonl"))
    ap.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/gpu.md"))
    ap.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_GPU_PRICE_PER_HOUR_USD,
                    help="USD per GPU-hour for cost_per_million_output_tokens_usd (default: an H100-class "
                    "card at a common cloud price)")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.early_reads is not None:  # before any engine captures its graphs
        decode_attention._PREFETCH = rotary_kv._EARLY_INPUTS = args.early_reads == "on"
    if args.pdl_trigger is not None:
        pdl.TRIGGER_FIRST = args.pdl_trigger == "first"
    if args.qkv_rope is not None:
        wna16.M1_ROPE = args.qkv_rope in ("on", "w4")
        gemv.DENSE_ROPE = args.qkv_rope in ("on", "dense")
    if args.w4_dp4a is not None:
        wna16.M1_DP4A = args.w4_dp4a == "on"
    workloads = args.workloads.split(",")
    engines = args.engines.split(",")
    card = torch.cuda.get_device_name()
    ceilings = report.measure_ceilings()
    print(f"card {card}: copy {ceilings['copy_GBps']:,.0f} GB/s, "
          f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    if args.suite == "quantization":
        import bench_gpu_quant

        bench_gpu_quant.run_suite(args, card, ceilings)
        return
    ctx = Ctx(args, card, ceilings, new_run_id(), [], args.out_dir)
    for shape in SHAPES:
        shape_workloads = [w for w in workloads if WORKLOADS[w][0] == shape]
        if not shape_workloads:
            continue
        model_dir = write_config(shape, args.out_dir / "configs")
        for key in [e for e in engines if e in ("ours", "ours_sync", "offline_defaults", "offline_tuned")]:
            # In the order given: the first engine of a process pays first-time costs (compiles).
            if key in ("ours", "ours_sync"):
                bench_ours(ctx, shape, model_dir, shape_workloads, async_scheduling=key == "ours")
            else:
                bench_offline(ctx, shape, model_dir, shape_workloads, tuned=key == "offline_tuned")
        if {"hf", "hf_batch"} & set(engines):
            bench_hf(ctx, shape, model_dir, shape_workloads, engines)
    append_results(args.results, ctx.rows)
    text = report.markdown(ctx.rows, card, ceilings, args.commit)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
