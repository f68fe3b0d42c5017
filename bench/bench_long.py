"""W6 long contexts (shared/BASELINES.md) through the public offline API, against physical floors.

    PYTHONPATH=. python bench/bench_long.py --commit $(git rev-parse HEAD) \\
        [--parts w6_8b,w6_1b,itl] [--itl-budgets 8192,2048,512,256] [--measure-ceilings]
    PYTHONPATH=. python bench/bench_long.py --smoke   # the same code on the CPU: tiny shapes and lengths

Parts (each selectable with ``--parts``; ``w6_8b`` and ``itl`` share one llama3-8b engine):

- ``w6_8b``: 8 requests of 32,768 random prompt tokens, 256 output tokens each (greedy,
  ``ignore_eos``), all submitted at once, on llama3-8b with Llama 3.1's rope scaling,
  ``max_model_len`` 65,536. Row ``W6-32k``.
- ``w6_1b``: one 131,072-token prompt, 8 output tokens, on llama3-1b (same rope scaling;
  ``max_model_len`` 131,072 + 8, so its config's ``max_position_embeddings`` is raised from
  Llama 3.1's 131,072 to that: llama3 rope depends only on the original 8,192). Row ``W6-131k``.
- ``itl``: 32 requests of 64-token prompts decode; their inter-token latency (ITL) is
  measured alone, then while one 32,768-token prompt is prefilled in chunks beside them. Rows
  ``W6-itl``, one per per-step token budget (``--itl-budgets``, the chunk size).

Models have random bf16 weights (``load_format="dummy"``), configs written here. Everything
runs through ``LLM(model, load_format="dummy", max_model_len=...)`` with the engine's defaults
but the serving step token budget (``max_num_batched_tokens`` 8192, which offline ``LLM`` raises
to 16384 on H100 / H200-class cards); requests are added to its engine
(``LLM.engine.add_request``, streaming deltas) and stepped here, so every token gets the wall
time at which ``step()`` handed it over, which is when a streaming client could have it.

Measures (`long_floors.py` holds the floor arithmetic; unit-tested in tests/bench/test_bench_long.py):

- Prefill tok/s: all prompt tokens over the time from submitting the requests to the first
  token of the last one (it includes sampling that token and the decode tokens of requests
  already prefilled, which ride along in the same steps: at most 7 of 8,192 tokens a step;
  the floor does not count them). Floor: the matrix products (2 x the linear weights per
  prompt token, the lm_head for each prompt's last token only) plus causal attention
  (per layer 2 x 2 x heads x head_dim FLOPs per visible query-key pair, L(L+1)/2 pairs) at the
  card's bf16 rate.
- Decode tok/s: tokens after the last first token over the time from it to the end; these
  steps decode only. Floor: each of those steps reads the weights (embedding excluded) and the
  K/V of every context token of every request in it, at the card's copy bandwidth (the floor
  of the same steps, batch shrinking at the end as in the run).
- Row ``output_tok_s``: all output tokens over the whole wall time; ``share_of_floor``: the
  floor time (prefill floor + decode floor of a lockstep batch) over the wall time.
- ITL: per short request, the gaps between its consecutive tokens. Alone: the gaps of the
  64 steps before the long prompt arrives. During prefill: every gap that overlaps the window
  from submitting the long prompt to its first token. Target (issue 16): p99 during prefill
  <= 3 x p50 alone. Each round follows a short discarded one at its budget, with the start-up
  objects frozen out of the garbage collector as the serving worker does (``run_itl``). Each
  ``--itl-budgets`` entry is set on the same engine's scheduler (``scheduler.
  max_num_batched_tokens``, read at every ``schedule()``; at most the configured budget, for
  which the runner's buffers are sized), so the sweep needs no reload; the KV pool (sized for
  the configured budget) does not matter here.

``--itl-profile`` (CUDA): after each ITL round, a torch.profiler table of six steps at the deep
end of another long prompt's chunked prefill (its last chunks, beside the short decodes) and
their wall times, written to ``itl_profile_<budget>.txt`` in ``--out-dir``; the same file has
the host side (self CPU time) and the kernels' time per step.

``--mixed-graph-max-tokens N`` sets the llama3-8b engine's ``mixed_graph_max_tokens`` (0: steps
with prefill chunks run eagerly; default the engine's, 512: piecewise CUDA graphs); rows record it.

``--prefill-split-kv on|off`` (CUDA only) sets the prefill attention's split-KV path
(``kernels.triton_ops.PrefillConfig.split_kv``) on every attention layer of the engine's model
after it is built (``set_prefill_split_kv``), for A/B runs; rows record it as
``prefill_split_kv`` (``default``: the engine's own op set, untouched).

Ceilings: 790 TFLOP/s bf16 and 4,200 GB/s (BASELINES.md, measured on H200s here) unless
``--measure-ceilings`` measures this card (``bench_gpu_report.measure_ceilings``); rows record
which. Appends rows to ``--results`` and writes a Markdown summary to ``--markdown``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_floors import SHAPES, SMOKE_SHAPE, Ceilings, Floors, Shape  # noqa: E402
from results import ResultRow, append_results, new_run_id, today  # noqa: E402

PARTS = ("w6_8b", "w6_1b", "itl")
ENGINE = "llmserve_offline"
# Llama 3.1's published rope scaling (config.json of Llama-3.1-8B / Llama-3.2-1B).
LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA31_MAX_POSITIONS = 131072


@dataclass(frozen=True)
class Spec:
    """Lengths and shapes of one run: the W6 numbers, or tiny ones for ``--smoke``."""

    big: str = "llama3-8b"
    small: str = "llama3-1b"
    requests: int = 8
    prompt: int = 32768
    output: int = 256
    big_max_model_len: int = 65536
    huge_prompt: int = 131072
    huge_output: int = 8
    itl_requests: int = 32
    itl_prompt: int = 64
    itl_long_prompt: int = 32768
    itl_budgets: tuple[int, ...] = (8192, 2048, 512, 256)
    itl_baseline_steps: int = 64
    itl_target: float = 3.0

    def shape(self, name: str) -> Shape:
        return SMOKE_SHAPE if name.startswith("smoke") else SHAPES[name]


SMOKE = Spec(big="smoke-big", small="smoke-small", requests=2, prompt=40, output=4, big_max_model_len=96,
             huge_prompt=72, huge_output=3, itl_requests=3, itl_prompt=6, itl_long_prompt=40,
             itl_budgets=(16, 8), itl_baseline_steps=4)


def write_config(name: str, shape: Shape, root: Path, max_positions: int) -> Path:
    """A Llama 3.1-style config.json (rope_theta 500000 with llama3 rope scaling), random weights."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
               rope_scaling=LLAMA3_ROPE_SCALING, max_position_embeddings=max_positions,
               rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16",
               bos_token_id=min(128000, shape.vocab - 2), eos_token_id=min(128001, shape.vocab - 1),
               **shape.hf_config())
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def random_prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, min(vocab, 128000), size=(n, length)).tolist()


def percentile_ms(values: Sequence[float], q: float) -> float:
    return 1e3 * float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


# ----------------------------------------------------------------------------- driving the engine


class StepDriver:
    """Drives an offline ``LLM``'s engine step by step and stamps every new token with the
    wall time at which ``step()`` returned it. ``steps``: ``(time, [(request, token index)])``."""

    def __init__(self, llm: Any) -> None:
        self.engine = llm.engine
        self._ids = itertools.count()
        self.tokens: dict[str, list[float]] = {}
        self.steps: list[tuple[float, list[tuple[str, int]]]] = []

    def add(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[str]:
        from gpu_worker.engine.output_processor import OutputKind
        from gpu_worker.sampling_params import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        ids = []
        for prompt in prompts:
            rid = f"w6-{next(self._ids)}"
            self.engine.add_request(rid, list(prompt), params, kind=OutputKind.DELTA)
            self.tokens[rid] = []
            ids.append(rid)
        return ids

    def step(self) -> None:
        outputs = self.engine.step()
        now = time.perf_counter()
        produced = []
        for out in outputs:
            times = self.tokens[out.request_id]
            for _ in out.outputs[0].token_ids:
                produced.append((out.request_id, len(times)))
                times.append(now)
        if produced:
            self.steps.append((now, produced))

    def run_until(self, done: Callable[[], bool]) -> None:
        while self.engine.has_unfinished_requests() and not done():
            self.step()

    def finish(self, abort: Sequence[str] = ()) -> None:
        """Abort ``abort`` and run until nothing is left, in flight included."""
        self.engine.abort_request(abort)
        while self.engine.has_unfinished_requests() or self.engine.core.has_unfinished():
            self.step()


def make_llm(model_dir: Path, max_model_len: int, smoke: bool,
             mixed_graph_max_tokens: int | None = None) -> Any:
    from gpu_worker import LLM
    from gpu_worker.config import CUDA_MAX_NUM_BATCHED_TOKENS

    # The serving budget (offline LLM's default is larger on H100 / H200-class cards; W6 measures
    # what a streaming client sees beside a long prefill).
    extra: dict[str, Any] = {"max_num_batched_tokens": CUDA_MAX_NUM_BATCHED_TOKENS}
    if mixed_graph_max_tokens is not None:
        extra["mixed_graph_max_tokens"] = mixed_graph_max_tokens
    # Smoke: a small budget, so that the tiny prompts are chunked as W6's are.
    if smoke:
        extra.update(device="cpu", max_num_seqs=16, max_num_batched_tokens=32)
    return LLM(model=str(model_dir), load_format="dummy", max_model_len=max_model_len, **extra)


def close_llm(llm: Any) -> None:
    """Drop the engine's CUDA graphs and other ranks; the caller then drops its references and
    calls :func:`free_device_memory`."""
    runner = llm.engine.core.runner
    for name in ("graphs", "mixed_graphs"):
        if getattr(runner, name, None) is not None:
            getattr(runner, name).clear()
    llm.shutdown()


def set_prefill_split_kv(model: Any, mode: str, long_chunk_tiles: str = "default") -> int:
    """Bind ``PrefillConfig(split_kv=mode == "on", long_chunk_tiles=long_chunk_tiles == "on")``
    to the Triton prefill attention of every attention layer of ``model`` (``default``: that
    field keeps its default; both ``default``: nothing changes). Returns the number of layers
    set; refuses op sets other than Triton's (the CPU references have no such path)."""
    if mode == "default" and long_chunk_tiles == "default":
        return 0
    for value in (mode, long_chunk_tiles):
        if value not in ("default", "on", "off"):
            raise ValueError(f"prefill modes must be default, on or off, got {value!r}")
    import functools

    from gpu_worker.model_executor.layers.attention import PagedAttention
    from kernels import triton_ops as tops

    base = tops.PrefillConfig()
    config = replace(
        base,
        split_kv=base.split_kv if mode == "default" else mode == "on",
        long_chunk_tiles=base.long_chunk_tiles if long_chunk_tiles == "default" else long_chunk_tiles == "on",
    )
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    for layer in layers:
        if layer.ops.name != "triton":
            raise ValueError(f"--prefill-split-kv needs the triton op set, the model has {layer.ops.name!r}")
        layer.ops = replace(layer.ops, paged_attention=functools.partial(tops.paged_attention, config=config))
    if not layers:
        raise ValueError("--prefill-split-kv: the model has no attention layers")
    return len(layers)


def free_device_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def warm_up(driver: StepDriver, llm: Any, vocab: int) -> None:
    """One prompt a chunk longer than the budget, two tokens: chunked, mixed and decode steps."""
    config = llm.engine.config
    length = min(config.token_budget + 16, config.max_model_len - 3)
    driver.add(random_prompts(1, length, 99, vocab), max_tokens=2)
    driver.finish()


# ----------------------------------------------------------------------------- the parts


def prefill_decode(
    driver: StepDriver, floors: Floors, n: int, length: int, out: int, seed: int
) -> dict[str, Any]:
    """Submit ``n`` prompts of ``length`` tokens at once, ``out`` tokens each; prefill and decode
    measures against their floors (module docstring)."""
    prompts = random_prompts(n, length, seed, floors.shape.vocab)
    t0 = time.perf_counter()
    first_step = len(driver.steps)
    ids = driver.add(prompts, max_tokens=out)
    driver.finish()
    mine_ids = set(ids)
    firsts = [driver.tokens[r][0] for r in ids]
    t_prefilled, end = max(firsts), max(driver.tokens[r][-1] for r in ids)
    decode_tokens, decode_floor_s = 0, 0.0
    for when, produced in driver.steps[first_step:]:
        mine = [j for r, j in produced if r in mine_ids]
        if when > t_prefilled and mine:
            decode_tokens += len(mine)
            decode_floor_s += floors.decode_step_s([length + j for j in mine])
    wall, prefill_s, decode_s = end - t0, t_prefilled - t0, end - t_prefilled
    prefill_floor_s = floors.prefill_s([length] * n)
    run_floor_s = floors.run_s([length] * n, out)
    decode_tok_s = decode_tokens / decode_s if decode_s > 0 else None
    return dict(
        output_tok_s=n * out / wall, share_of_floor=round(run_floor_s / wall, 4),
        elapsed_s=round(wall, 4), floor_s=round(run_floor_s, 4),
        prefill_s=round(prefill_s, 4), prefill_tok_s=round(n * length / prefill_s, 1),
        prefill_floor_tok_s=round(n * length / prefill_floor_s, 1),
        prefill_share_of_floor=round(prefill_floor_s / prefill_s, 4),
        ttft_first_s=round(min(firsts) - t0, 3), ttft_last_s=round(prefill_s, 3),
        decode_tokens=decode_tokens, decode_s=round(decode_s, 4),
        decode_tok_s=None if decode_tok_s is None else round(decode_tok_s, 1),
        decode_floor_tok_s=round(decode_tokens / decode_floor_s, 1) if decode_floor_s else None,
        decode_share_of_floor=round(decode_floor_s / decode_s, 4) if decode_tok_s and decode_floor_s
        else None,
        requests=n, prompt_tokens=length, output_tokens=out,
    )


def itl_run(driver: StepDriver, spec: Spec, budget: int, seed: int) -> dict[str, Any]:
    """Short requests decode alone, then beside a long prompt's chunked prefill (module docstring)."""
    vocab = driver.engine.core.vocab_size
    n, baseline = spec.itl_requests, spec.itl_baseline_steps
    chunk_steps = math.ceil(spec.itl_long_prompt / max(1, budget - n))
    # Outlasts the prefill (aborted after it), within the context.
    max_tokens = 16 + baseline + 2 * chunk_steps + 64
    max_tokens = min(max_tokens, driver.engine.config.max_model_len - spec.itl_prompt)
    short = driver.add(random_prompts(n, spec.itl_prompt, seed, vocab), max_tokens=max_tokens)
    driver.run_until(lambda: all(len(driver.tokens[r]) >= 3 for r in short))
    t_base = time.perf_counter()
    for _ in range(baseline):
        driver.step()
    t_submit = time.perf_counter()
    (long_id,) = driver.add(random_prompts(1, spec.itl_long_prompt, seed + 1, vocab), max_tokens=1)
    driver.run_until(lambda: bool(driver.tokens[long_id]))
    t_first = driver.tokens[long_id][0]
    alone: list[float] = []
    during: list[float] = []
    tokens_during = 0
    for r in short:
        times = driver.tokens[r]
        tokens_during += sum(1 for t in times if t_submit < t <= t_first)
        for prev, cur in itertools.pairwise(times):
            if prev >= t_base and cur <= t_submit:
                alone.append(cur - prev)
            elif cur > t_submit and prev < t_first:
                during.append(cur - prev)
    driver.finish(abort=short)
    p50_alone, p99_during = percentile_ms(alone, 50), percentile_ms(during, 99)
    ratio = p99_during / p50_alone if alone and during else float("nan")
    window = t_first - t_submit
    return dict(
        output_tok_s=tokens_during / window, share_of_floor=None, max_num_batched_tokens=budget,
        itl_p50_ms_alone=round(p50_alone, 3), itl_p99_ms_alone=round(percentile_ms(alone, 99), 3),
        itl_max_ms_alone=round(1e3 * max(alone, default=math.nan), 3),
        itl_p50_ms_during_prefill=round(percentile_ms(during, 50), 3),
        itl_p99_ms_during_prefill=round(p99_during, 3),
        itl_max_ms_during_prefill=round(1e3 * max(during, default=math.nan), 3),
        p99_during_over_p50_alone=round(ratio, 3), target_ratio=spec.itl_target,
        target_met=bool(ratio <= spec.itl_target), itl_samples_alone=len(alone),
        itl_samples_during=len(during), long_prompt_tokens=spec.itl_long_prompt,
        long_prefill_s=round(window, 4), long_prefill_tok_s=round(spec.itl_long_prompt / window, 1),
        short_requests=n, short_prompt_tokens=spec.itl_prompt,
    )


def profile_deep_steps(driver: StepDriver, spec: Spec, budget: int, path: Path, steps: int = 6) -> None:
    """torch.profiler over ``steps`` steps at the deep end of the long prompt's chunked prefill
    (its last chunks, beside the short requests' decodes): the kernels by GPU time, and each
    step's wall time, written to ``path`` (``--itl-profile``; untimed, after the ITL round)."""
    from torch.profiler import ProfilerActivity, profile

    vocab = driver.engine.core.vocab_size
    n = spec.itl_requests
    short = driver.add(random_prompts(n, spec.itl_prompt, 7, vocab), max_tokens=spec.itl_long_prompt)
    driver.run_until(lambda: all(len(driver.tokens[r]) >= 3 for r in short))
    (long_id,) = driver.add(random_prompts(1, spec.itl_long_prompt, 8, vocab), max_tokens=1)
    chunk_steps = math.ceil(spec.itl_long_prompt / max(1, budget - n))
    for _ in range(max(0, chunk_steps - steps - 2)):
        driver.step()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            driver.step()
            walls.append(1e3 * (time.perf_counter() - t0))
    driver.finish(abort=[*short, long_id])
    averages = prof.key_averages()
    table = averages.table(sort_by="self_device_time_total", row_limit=20)
    # Host side: where a step's CPU time goes (a step whose launches take longer than its
    # kernels run is bound by the host, whatever the attention costs).
    host = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    device_ms = sum(e.self_device_time_total for e in averages) / 1e3 / steps
    head = (f"budget {budget}: {steps} steps from chunk {chunk_steps - steps - 2} of {chunk_steps}, "
            f"wall ms per step {[round(w, 1) for w in walls]}, device ms per step {device_ms:.1f}\n")
    path.write_text(head + table + "\n\nBy host (self CPU) time:\n" + host)
    print(head + "\n".join(table.splitlines()[:16]) + "\n" + "\n".join(host.splitlines()[:22]), flush=True)


def set_token_budget(llm: Any, budget: int) -> int:
    """Set the scheduler's per-step token budget (at most the configured one); returns the old."""
    configured = llm.engine.config.token_budget
    if budget > configured:
        raise ValueError(f"ITL budget {budget} exceeds the engine's max_num_batched_tokens {configured}")
    scheduler = llm.engine.core.scheduler
    old: int = scheduler.max_num_batched_tokens
    scheduler.max_num_batched_tokens = budget
    return old


# ----------------------------------------------------------------------------- driver


@dataclass
class Run:
    args: argparse.Namespace
    spec: Spec
    card: str
    ceilings: Ceilings
    run_id: str
    rows: list[ResultRow]

    def add(self, workload: str, shape: str, llm: Any, measured: dict[str, Any]) -> None:
        extra = dict(measured)
        tok_s = extra.pop("output_tok_s")
        config = llm.engine.config
        extra.setdefault("max_num_batched_tokens", config.token_budget)
        extra.update(max_model_len=config.max_model_len, num_kv_blocks=llm.engine.core.num_kv_blocks,
                     rope_scaling="llama3 x8 (Llama 3.1)", matmul_TFLOPs=self.ceilings.matmul_tflops,
                     copy_GBps=self.ceilings.copy_gbps, ceilings=self.ceilings.source,
                     prefill_split_kv=self.args.prefill_split_kv,
                     mixed_graph_max_tokens=config.mixed_graph_max_tokens,
                     prefill_long_chunk_tiles=self.args.prefill_long_chunk_tiles)
        row = ResultRow(self.run_id, today(), self.args.commit, self.card, workload, shape, ENGINE, tok_s,
                        extra, quantization=config.quantization, kv_cache_dtype=config.kv_cache_dtype,
                        tensor_parallel_size=config.tensor_parallel_size,
                        pipeline_parallel_size=config.pipeline_parallel_size)
        self.rows.append(row)
        print(f"  {workload} {shape}: {tok_s:,.1f} tok/s {extra}", flush=True)


def run_big(run: Run, root: Path, parts: list[str]) -> None:
    spec = run.spec
    shape = spec.shape(spec.big)
    model_dir = write_config(spec.big, shape, root, LLAMA31_MAX_POSITIONS)
    t0 = time.perf_counter()
    llm = make_llm(model_dir, spec.big_max_model_len, run.args.smoke, run.args.mixed_graph_max_tokens)
    set_prefill_split_kv(llm.engine.core.runner.model, run.args.prefill_split_kv,
                         run.args.prefill_long_chunk_tiles)
    driver = StepDriver(llm)
    warm_up(driver, llm, shape.vocab)
    print(f"[{spec.big}] engine ready in {time.perf_counter() - t0:.1f}s", flush=True)
    if "w6_8b" in parts:
        floors = Floors(shape, run.ceilings)
        measured = prefill_decode(driver, floors, spec.requests, spec.prompt, spec.output, seed=1)
        run.add("W6-32k", spec.big, llm, measured)
    if "itl" in parts:
        run_itl(run, llm, driver)
    close_llm(llm)


def run_itl(run: Run, llm: Any, driver: StepDriver) -> None:
    """The ITL rounds, one per budget, each after a short discarded round at that budget (first
    steps of each shape). As in the serving worker, the objects alive after start-up are frozen
    out of the garbage collector's reach, and each round starts with a collection."""
    from llmserve.gc_tuning import freeze_startup_objects, unfreeze_objects

    spec = run.spec
    freeze_startup_objects()
    try:
        for i, budget in enumerate(run.args.itl_budgets or spec.itl_budgets):
            old = set_token_budget(llm, budget)
            try:
                # A whole long prompt: every kernel variant its chunks need compiles here, not in
                # the timed round (a ~1 s stall each otherwise, e.g. the split-KV partition counts
                # as the context grows; H200, run 20261203T154417Z-cdbc1f).
                warm = replace(spec, itl_baseline_steps=4)
                itl_run(driver, warm, budget, seed=99)
                gc.collect()
                run.add("W6-itl", spec.big, llm, itl_run(driver, spec, budget, seed=100 + 2 * i))
                if run.args.itl_profile:
                    profile_deep_steps(driver, spec, budget, run.args.out_dir / f"itl_profile_{budget}.txt")
            finally:
                set_token_budget(llm, old)
    finally:
        unfreeze_objects()


def run_small(run: Run, root: Path) -> None:
    spec = run.spec
    shape = spec.shape(spec.small)
    max_len = spec.huge_prompt + spec.huge_output
    # Llama 3.1 publishes 131,072 positions; W6 needs its 131,072-token prompt plus the outputs
    # (llama3 rope does not depend on max_position_embeddings, only on the original 8,192).
    model_dir = write_config(spec.small, shape, root, max(LLAMA31_MAX_POSITIONS, max_len))
    t0 = time.perf_counter()
    llm = make_llm(model_dir, max_len, run.args.smoke)
    set_prefill_split_kv(llm.engine.core.runner.model, run.args.prefill_split_kv,
                         run.args.prefill_long_chunk_tiles)
    driver = StepDriver(llm)
    warm_up(driver, llm, shape.vocab)
    print(f"[{spec.small}] engine ready in {time.perf_counter() - t0:.1f}s", flush=True)
    measured = prefill_decode(driver, Floors(shape, run.ceilings), 1, spec.huge_prompt, spec.huge_output, 3)
    run.add("W6-131k", spec.small, llm, measured)
    close_llm(llm)


def markdown(run: Run) -> str:
    out = [f"# W6 long contexts: card {run.card}, commit `{run.args.commit[:12]}`, run `{run.run_id}`", "",
           f"Ceilings: {run.ceilings.matmul_tflops:.0f} TFLOP/s bf16, {run.ceilings.copy_gbps:,.0f} GB/s "
           f"({run.ceilings.source}). `bench/bench_long.py`.", "",
           "| workload | model | output tok/s | share of floor | prefill tok/s (floor, share) | "
           "decode tok/s (floor, share) | ITL p50 alone / p99 during prefill (ratio, budget) |",
           "| --- | --- | ---: | ---: | --- | --- | --- |"]
    for r in run.rows:
        e = r.extra
        share = "" if e.get("share_of_floor") is None else f"{100 * e['share_of_floor']:.0f}%"
        prefill = decode = itl = ""
        if "prefill_tok_s" in e:
            prefill = (f"{e['prefill_tok_s']:,.0f} ({e['prefill_floor_tok_s']:,.0f}, "
                       f"{100 * e['prefill_share_of_floor']:.0f}%)")
            if e.get("decode_tok_s") is not None and e.get("decode_share_of_floor") is not None:
                decode = (f"{e['decode_tok_s']:,.0f} ({e['decode_floor_tok_s']:,.0f}, "
                          f"{100 * e['decode_share_of_floor']:.0f}%)")
        if "itl_p50_ms_alone" in e:
            met = "met" if e["target_met"] else "missed"
            itl = (f"{e['itl_p50_ms_alone']:.1f} / {e['itl_p99_ms_during_prefill']:.1f} ms "
                   f"({e['p99_during_over_p50_alone']:.1f}x, {met}; budget {e['max_num_batched_tokens']})")
        cells = [r.workload, r.model_shape, f"{r.output_tok_s:,.1f}", share, prefill, decode, itl]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--itl-budgets", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="per-step token budgets (chunk sizes) of the ITL part (default 8192,2048,512,256)")
    ap.add_argument("--measure-ceilings", action="store_true",
                    help="measure this card's bf16 matmul rate and copy bandwidth (else BASELINES.md's)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU plumbing check: tiny random model, tiny lengths (numbers mean nothing)")
    ap.add_argument("--prefill-split-kv", choices=("default", "on", "off"), default="default",
                    help="A/B the prefill attention's split-KV path in every part (CUDA only; "
                         "default: the engine's own op set)")
    ap.add_argument("--prefill-long-chunk-tiles", choices=("default", "on", "off"), default="default",
                    help="A/B PrefillConfig.long_chunk_tiles (tile height from the longest query when a "
                         "context is long; CUDA only)")
    ap.add_argument("--mixed-graph-max-tokens", type=int, default=None,
                    help="the llama3-8b engine's mixed_graph_max_tokens (0: mixed steps eager; default: "
                         "the engine's)")
    ap.add_argument("--itl-profile", action="store_true",
                    help="after each ITL round, profile steps at the deep end of a long prefill (CUDA)")
    ap.add_argument("--run-id", default="", help="the rows' run_id (default: a new one)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    ap.add_argument("--results", type=Path, default=Path("docs/benchmarks/results.jsonl"))
    ap.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/long_context.md"))
    args = ap.parse_args(argv)
    if args.smoke and (args.prefill_split_kv, args.prefill_long_chunk_tiles) != ("default", "default"):
        ap.error("--prefill-split-kv and --prefill-long-chunk-tiles need the Triton kernels (CUDA); "
                 "the CPU smoke runs the references")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[ResultRow]:
    args = parse_args(argv)
    parts = args.parts.split(",")
    spec = SMOKE if args.smoke else Spec()
    ceilings = Ceilings()
    if args.smoke:
        card = "cpu (smoke)"
    else:
        import torch

        card = torch.cuda.get_device_name()
        if args.measure_ceilings:
            import bench_gpu_report

            measured = bench_gpu_report.measure_ceilings()
            ceilings = replace(ceilings, matmul_tflops=measured["matmul_TFLOPs"],
                               copy_gbps=measured["copy_GBps"], source="measured in this run")
    print(f"card {card}: {ceilings}", flush=True)
    run = Run(args, spec, card, ceilings, args.run_id or new_run_id(), [])
    root = args.out_dir / "configs_long"
    if {"w6_8b", "itl"} & set(parts):
        run_big(run, root, parts)
        free_device_memory()
    if "w6_1b" in parts:
        run_small(run, root)
        free_device_memory()
    append_results(args.results, run.rows)
    text = markdown(run)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text)
    print(text, flush=True)
    return run.rows


if __name__ == "__main__":
    main()
