"""Issue 13 on the GPU: quantized weights and KV cache against bf16, same process, same card.

    PYTHONPATH=. python bench/bench_gpu.py --suite quantization --commit $(git rev-parse HEAD)

On an H200 (2026-12-02) each shape's part took about 65 s (suite time, after the ceilings are
measured); ``--quant-shapes`` runs some shapes only (one call per shape, ``--run-id`` joining
them). In order:

1. llama3-8b bf16: W1, W2 (the baseline rows of this run);
2. llama3-8b fp8 weights: W2, W1; then W2 again with ``fp8_weight_only_max_tokens=0`` (W8A8 at
   one token, the configuration before fp8 decode went weight-only);
3. llama3-8b fp8 weights + fp8 KV cache: W1, W2; then fp8 weights in 128 x 128 blocks
   (``fp8-block``, a DeepSeek-style checkpoint's layout, random): W2, W1;
4. llama3-8b W4A16 (random symmetric 4-bit weights, groups of 128, created packed): W2, with the
   LM head in bf16 (``w4a16``, as most GPTQ checkpoints store it) and in 4 bits too
   (``w4a16+head``: a GPTQ checkpoint's ``lm_head: true``, as a GGUF's quantized
   ``output.weight`` is served);
5. W5, llama3-70b fp8 weights + fp8 KV cache on one card: W1 (256 requests: tok/s, KV pool in
   tokens), W2 against its fp8 bandwidth roofline;
6. HF transformers with llama3-70b in bf16 on the same card: its out-of-memory (building the
   model, or, if the ~131 GiB of weights fit, generating W1's 256 requests) is recorded.

``--quant-labels bf16,fp8,...`` runs only those engines; ``--profile`` adds a torch.profiler table
of six W2 decode steps per engine (``profile_W2_<shape>_<label>.txt``).

Every row carries ``quantization``, ``kv_cache_dtype``, ``tensor_parallel_size`` and
``pipeline_parallel_size``; W1/W2 rows carry ``share_of_floor`` against the floor of their own
format (bytes per weight and per KV element; prefill at twice the bf16 matmul rate for fp8
weights, whose products run on fp8 tensor cores). The table and the issue's targets are
printed at the end, rows appended to ``--results``, the Markdown report written.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import bench_gpu as bench
import bench_gpu_report as report
import torch
from results import ResultRow, append_results, new_run_id, today

from kernels import resolve_fp8_weight_only_max_m
from kernels.triton_ops import wna16 as twna16
from kernels.triton_ops.gemv import GemvTiles

# Bytes per weight of a projection as served: e4m3 (the float32 scale per row is negligible);
# 4-bit: a nibble plus a float16 scale per group of 128.
LINEAR_BYTES = {"none": 2.0, "fp8": 1.0, "w4a16": 0.5 + 2 / 128}
VOCAB = 128256
# (name, engine arguments, workloads): the engines of steps 1-5 of the module docstring.
PLAN: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("llama3-8b", "bf16", {}, ["W1", "W2"]),
    ("llama3-8b", "fp8", {"quantization": "fp8"}, ["W2", "W1"]),
    # The previous configuration, same run: W8A8 at one token too (activation quantized).
    ("llama3-8b", "fp8-w8a8", {"quantization": "fp8", "fp8_weight_only_max_tokens": 0}, ["W2"]),
    ("llama3-8b", "fp8+fp8kv", {"quantization": "fp8", "kv_cache_dtype": "fp8"}, ["W1", "W2"]),
    # Block-wise fp8 (DeepSeek-style 128 x 128 weight blocks, activations per token group of 128).
    ("llama3-8b", "fp8-block", {"quantization": "fp8"}, ["W2", "W1"]),
    ("llama3-8b", "w4a16", {"quantization": "gptq"}, ["W2"]),
    ("llama3-8b", "w4a16+head", {"quantization": "gptq"}, ["W2"]),
    ("llama3-70b", "fp8+fp8kv", {"quantization": "fp8", "kv_cache_dtype": "fp8"}, ["W1", "W2"]),
]
# Config keys of a label's model folder: the 4-bit LM head of a GPTQ checkpoint saved with
# ``lm_head: true`` (random weights, so only the flag matters).
CONFIG_EXTRA: dict[str, dict[str, Any]] = {
    "fp8-block": {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}},
    "w4a16+head": {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                                           "desc_act": False, "lm_head": True}},
}
# (what, numerator (shape, engine, workload), denominator, minimum ratio): issue 13's targets.
TARGETS = [
    ("W2 llama3-8b fp8 vs bf16", ("llama3-8b", "fp8", "W2"), ("llama3-8b", "bf16", "W2"), 1.6),
    ("W1 llama3-8b fp8+fp8 KV vs bf16", ("llama3-8b", "fp8+fp8kv", "W1"), ("llama3-8b", "bf16", "W1"), 1.3),
    ("W2 llama3-8b W4A16 vs bf16", ("llama3-8b", "w4a16", "W2"), ("llama3-8b", "bf16", "W2"), 2.2),
    # The same with the LM head in 4 bits too (a GPTQ ``lm_head: true`` checkpoint): not the
    # issue's configuration (its bf16 head), printed beside it.
    ("W2 llama3-8b W4A16 + 4-bit LM head vs bf16", ("llama3-8b", "w4a16+head", "W2"),
     ("llama3-8b", "bf16", "W2"), 2.2),
]


def shape_numbers(
    shape: str, quantization: str, kv_cache_dtype: str, head_quantized: bool = False
) -> dict[str, float]:
    """``report.shape_numbers`` with the bytes of a quantized model: projections at their
    format's bytes per weight, the LM head in bf16 (at the projections' bytes with
    ``head_quantized``), KV elements of 1 (fp8) or 2 bytes."""
    dims = bench.SHAPES[shape]
    cfg = report.shape_numbers(dims)
    h, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    hq, hk, d = dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    linear = layers * (h * (hq + 2 * hk) * d + hq * d * h + 3 * h * inter)
    if head_quantized:
        linear += VOCAB * h
    rest = cfg["params"] - linear  # norms, the embedding (a lookup: not read per step) and a 16-bit head
    cfg["weight_bytes"] = linear * LINEAR_BYTES[quantization] + rest * 2
    kv_elem = 1 if kv_cache_dtype == "fp8" else 2
    cfg["kv_bytes_per_token"] = 2 * layers * hk * d * kv_elem
    return cfg


@dataclass
class Run:
    args: Any
    card: str
    ceilings: dict[str, float]
    run_id: str = field(default_factory=new_run_id)
    rows: list[ResultRow] = field(default_factory=list)
    m1_shape_tiles: str | None = None  # one_token_settings(): recorded on every row of the run

    def add(
        self, workload: str, shape: str, engine: str, tok_s: float, quantization: str, kv: str, **extra: Any
    ) -> None:
        self.rows.append(
            ResultRow(
                self.run_id,
                today(),
                self.args.commit,
                self.card,
                workload,
                shape,
                engine,
                tok_s,
                {k: v for k, v in (extra | self.settings()).items() if v is not None},
                quantization=quantization,
                kv_cache_dtype=kv,
            )
        )
        print(
            f"  {workload} {shape} {engine} [{quantization}, kv {kv}]: {tok_s:,.1f} tok/s {extra}", flush=True
        )

    def settings(self) -> dict[str, Any]:
        """The run's engine settings every row records."""
        return {"m1_shape_tiles": self.m1_shape_tiles, "early_reads": bench.early_reads(),
                "pdl_trigger": bench.pdl_trigger(), "qkv_rope": bench.qkv_rope(),
                "w4_decode": bench.w4_decode(), "gc_freeze": self.args.gc_freeze}

    def find(self, shape: str, label: str, workload: str) -> ResultRow | None:
        return next(
            (
                r
                for r in self.rows
                if (r.model_shape, r.extra.get("label"), r.workload) == (shape, label, workload)
            ),
            None,
        )


def bench_engine(run: Run, shape: str, label: str, engine_args: dict[str, Any], workloads: list[str]) -> None:
    extra = CONFIG_EXTRA.get(label)
    folder = f"{shape}-{label}" if extra else None
    model_dir = bench.write_config(shape, run.args.out_dir / "configs", extra, folder)
    quantization = {"fp8": "fp8", "gptq": "w4a16"}.get(engine_args.get("quantization", ""), "none")
    kv = engine_args.get("kv_cache_dtype", "auto")
    engine = bench.OurEngine(model_dir, gc_freeze=run.args.gc_freeze == "on", **engine_args)
    try:
        _bench_workloads(run, engine, shape, label, quantization, kv, workloads)
    finally:
        engine.close()


def _weight_block(model: Any) -> str | None:
    """``"128x128"`` for block-wise fp8 weights (the first decoder layer's MLP), else None."""
    method = getattr(model.model.layers[0].mlp.down_proj, "linear_method", None)
    block = getattr(method, "block", None)
    return None if block is None else f"{block[0]}x{block[1]}"


def _bench_workloads(
    run: Run, engine: Any, shape: str, label: str, quantization: str, kv: str, workloads: list[str]
) -> None:
    core = engine.core
    kv_tokens = engine.num_blocks * core.config.block_size
    print(
        f"[llmserve {shape} {label}] load {engine.load_s:.1f}s warmup+capture {engine.warmup_s:.1f}s, "
        f"weights {core.weight_bytes / 2**30:.1f} GiB, KV pool {kv_tokens:,} tokens "
        f"({core.runner.kv_cache_dtype})",
        flush=True,
    )
    head_quantized = bool(getattr(core.runner.model.lm_head, "quantized", False))
    cfg = shape_numbers(shape, quantization, kv, head_quantized)
    ceilings = dict(run.ceilings)
    if quantization == "fp8":
        ceilings["matmul_TFLOPs"] *= 2  # fp8 tensor cores
    common = dict(
        label=label,
        lm_head=quantization if head_quantized else "bf16",
        fp8_weight_only_max_tokens=(
            resolve_fp8_weight_only_max_m(core.config.fp8_weight_only_max_tokens)
            if quantization == "fp8" else None
        ),
        weight_block=_weight_block(core.runner.model),
        weight_GiB=round(core.weight_bytes / 2**30, 2),
        kv_pool_tokens=kv_tokens,
        load_s=round(engine.load_s, 1),
    )
    for w in workloads:
        _, n, p_len, o_len = bench.WORKLOADS[w]
        name = "W5" if shape == "llama3-70b" else w
        bench.warm_up(engine, w)
        if w == "W2":
            res, tpot, tpot_runs = bench.latency_runs(engine, p_len, o_len, run.args.w2_runs)
            floor = report.w2_roofline_tok_s(cfg, ceilings, p_len, o_len)
            run.add(
                f"{name}-W2" if name == "W5" else w,
                shape,
                "llmserve",
                1 / tpot,
                quantization,
                kv,
                tpot_ms=round(tpot * 1e3, 4),
                ttft_s=round(res["ttft_s"], 4),
                floor_tok_s=round(floor, 1),
                share_of_floor=round(1 / tpot / floor, 4),
                **bench.w2_step_fields(engine, res),
                tpot_runs_ms=tpot_runs,
                **common,
            )
            if run.args.profile:  # bench_gpu.py --profile: the kernels of six batch-1 decode steps
                stats = bench.profile_decode(engine, bench.prompts_for(1, p_len, 3), run.args.out_dir,
                                             f"{w}_{shape}_{label}")
                print(f"  profile {w} {shape} {label}: {stats}", flush=True)
                run.rows[-1].extra.update({k: round(v, 4) for k, v in stats.items()})
            continue
        prompts = bench.prompts_for(n, p_len, 1)
        res = engine.run(prompts, o_len)
        tok_s = res["output_tokens"] / res["elapsed_s"]
        floor = report.w1_floor_tok_s(cfg, ceilings, n, p_len, o_len)
        assert res["output_tokens"] == n * o_len, "every request completes"
        run.add(
            f"{name}-W1" if name == "W5" else w,
            shape,
            "llmserve",
            tok_s,
            quantization,
            kv,
            elapsed_s=round(res["elapsed_s"], 3),
            requests_completed=n,
            floor_tok_s=round(floor, 1),
            share_of_floor=round(tok_s / floor, 4),
            preemptions=core.stats().num_preemptions,
            **bench.decode_step_stats(res, n),
            **common,
        )


def bench_hf_70b(run: Run) -> None:
    """HF transformers with llama3-70b in bf16 on this card: its weights alone are ~131 GiB. If
    they fit, W1's 256 requests are tried as one static batch (its KV cache needs ~60 GiB more):
    the out-of-memory (at load or in generate) or the result is recorded."""
    model_dir = bench.write_config("llama3-70b", run.args.out_dir / "configs")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tok_s, stage, model = 0.0, "load", None
    try:
        model = bench.hf_model(model_dir)
        stage = "generate W1 (256 requests, one static batch)"
        _, n, p_len, o_len = bench.WORKLOADS["W1"]
        res = bench.hf_static(model, bench.prompts_for(n, p_len, 1), n, o_len, 1)
        tok_s = res["output_tokens"] / res["elapsed_s"]
        outcome = f"completed W1 in one static batch of {n}"
    except torch.OutOfMemoryError as exc:
        outcome = f"CUDA out of memory at {stage}: " + str(exc).split("\n")[0][:160]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    gc.collect()
    torch.cuda.empty_cache()
    run.add(
        "W5-W1",
        "llama3-70b",
        "hf_generate_static",
        tok_s,
        "none",
        "auto",
        label="hf-bf16",
        outcome=outcome,
        peak_allocated_GiB=round(peak, 1),
        seconds_to_outcome=round(time.perf_counter() - t0, 1),
    )


def table(run: Run) -> str:
    head = (
        "| workload | model | engine | quantization | KV | output tok/s | share of floor | KV pool tokens "
        "| notes |"
    )
    out = [head, "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in run.rows:
        share = r.extra.get("share_of_floor")
        out.append(
            f"| {r.workload} | {r.model_shape} | {r.engine} | {r.quantization} | {r.kv_cache_dtype} "
            f"| {r.output_tok_s:,.1f} | {'' if share is None else f'{share:.0%}'} "
            f"| {r.extra.get('kv_pool_tokens', '')} | {r.extra.get('outcome', '')} |"
        )
    out += ["", "Targets (issue 13):"]
    for what, num, den, minimum in TARGETS:
        a, b = run.find(*num), run.find(*den)
        if a is not None and b is not None and b.output_tok_s > 0:
            ratio = a.output_tok_s / b.output_tok_s
            out.append(
                f"- {what}: {ratio:.2f}x (target {minimum}x): {'met' if ratio >= minimum else 'MISSED'}"
            )
    for w in ("W2", "W1"):
        a, b = run.find("llama3-8b", "fp8-block", w), run.find("llama3-8b", "fp8", w)
        if a is not None and b is not None and b.output_tok_s > 0:
            out.append(f"- {w} llama3-8b fp8 128x128 blocks vs fp8 per channel: "
                       f"{a.output_tok_s / b.output_tok_s:.3f}x")
    a, b = run.find("llama3-8b", "fp8", "W2"), run.find("llama3-8b", "fp8-w8a8", "W2")
    if a is not None and b is not None and b.output_tok_s > 0:
        out.append(f"- W2 llama3-8b fp8, weight-only (W8A16) vs W8A8 at one token: "
                   f"{a.output_tok_s / b.output_tok_s:.3f}x")
    w5 = run.find("llama3-70b", "fp8+fp8kv", "W5-W2")
    if w5 is not None:
        share = w5.extra["share_of_floor"]
        out.append(
            f"- W5-W2 llama3-70b fp8: {share:.0%} of its roofline {w5.extra['floor_tok_s']} tok/s "
            f"(target 75%): {'met' if share >= 0.75 else 'MISSED'}"
        )
    w5_w1 = run.find("llama3-70b", "fp8+fp8kv", "W5-W1")
    if w5_w1 is not None:
        out.append(
            f"- W5-W1 llama3-70b fp8 on one card: {w5_w1.extra['requests_completed']} requests completed, "
            f"{w5_w1.output_tok_s:,.0f} tok/s, KV pool {w5_w1.extra['kv_pool_tokens']:,} tokens"
        )
    return "\n".join(out) + "\n"


def _tiles_table(path: Path, table: dict[str, Any], key: str) -> Mapping[tuple[int, int], GemvTiles]:
    """``table[key]`` (``{"N,K": [block_n, block_k, warps, split]}``) as a tiling table."""
    if not isinstance(table.get(key, {}), dict):
        raise ValueError(f"{path}: '{key}' must map 'N,K' to [block_n, block_k, warps, split]")
    return MappingProxyType({tuple(int(v) for v in name.split(",")): GemvTiles(*(int(v) for v in tiles))
                             for name, tiles in table.get(key, {}).items()})


def use_w4_tiles(path: Path) -> str:
    """Set the one-token tilings in ``path`` (bench_gemv.py ``--w4-table``: ``{"tiles": {"N,K":
    [block_n, block_k, warps, split]}}``, optionally ``"packed_tiles"`` in the same form) before
    any engine loads (layers size their split counts at load): ``wna16.M1_SHAPE_TILES`` and
    ``wna16.M1_PACKED_TILES`` (empty where the file has none: the file is the whole table). Any
    other key (an older table's ``prefetch``, ``linear16_prefetch``, ``fp8_prefetch`` or ``tma``:
    switches since removed, DECISIONS 141 and 150) raises ValueError rather than applying the
    table in part. Returns the settings as text."""
    table = json.loads(path.read_text())
    others = sorted(set(table) - {"tiles", "packed_tiles"})
    if others:
        raise ValueError(f"{path}: unknown key(s) {', '.join(others)}: a one-token table holds only 'tiles' "
                         "and 'packed_tiles' (the prefetch switches and the TMA GEMV were removed, "
                         "DECISIONS 141 and 150)")
    tiles, packed = _tiles_table(path, table, "tiles"), _tiles_table(path, table, "packed_tiles")
    if "tiles" in table:
        twna16.M1_SHAPE_TILES = tiles
    twna16.M1_PACKED_TILES = packed
    return one_token_settings()


def one_token_settings() -> str:
    """The one-token GEMV settings in effect (the defaults, or what :func:`use_w4_tiles` set), in
    :func:`use_w4_tiles`' format (``packed_tiles`` only where there are some): every row of a
    run records them (``m1_shape_tiles``)."""
    table = {name: {f"{n},{k}": [t.block_n, t.block_k, t.num_warps, t.split_k]
                    for (n, k), t in sorted(tab.items())}
             for name, tab in (("tiles", twna16.M1_SHAPE_TILES), ("packed_tiles", twna16.M1_PACKED_TILES))
             if tab or name == "tiles"}
    return json.dumps(table, separators=(",", ":"), sort_keys=True)


def run_suite(args: Any, card: str, ceilings: dict[str, float]) -> None:
    """The suite of the module docstring (``bench_gpu.py --suite quantization``)."""
    run = Run(args, card, ceilings, run_id=args.run_id or new_run_id())
    if args.w4_tiles is not None:
        run.m1_shape_tiles = use_w4_tiles(args.w4_tiles)
        print(f"wna16.M1_SHAPE_TILES from {args.w4_tiles}: {run.m1_shape_tiles}", flush=True)
    else:
        run.m1_shape_tiles = one_token_settings()
    shapes = args.quant_shapes.split(",")
    t0 = time.perf_counter()
    saved = 0
    for shape, label, engine_args, workloads in PLAN:
        workloads = [w for w in workloads if w in args.workloads.split(",")]  # --workloads
        labels = args.quant_labels.split(",") if args.quant_labels else [label]  # --quant-labels
        if shape not in shapes or not workloads or label not in labels:
            continue
        try:
            bench_engine(run, shape, label, engine_args, workloads)
        except Exception as exc:  # one engine's failure is reported; the others still run
            print(f"[llmserve {shape} {label}] FAILED: {exc!r}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        saved += append_results(args.results, run.rows[saved:])  # kept if a later step is killed
    if "llama3-70b" in shapes and "W1" in args.workloads.split(","):  # HF's out-of-memory is W1's
        bench_hf_70b(run)
    append_results(args.results, run.rows[saved:])
    text = f"# Quantization on {card} (run {run.run_id}, commit {args.commit[:12]})\n\n" + table(run)
    markdown = (
        args.markdown
        if args.markdown != Path("docs/benchmarks/gpu.md")
        else Path(f"docs/benchmarks/quantization_gpu_{'_'.join(shapes)}.md")
    )
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text)
    print(text)
    print(f"suite took {time.perf_counter() - t0:.0f} s", flush=True)
