"""Card ceilings, physical floors (shared/BASELINES.md) and the Markdown report of bench_gpu.py."""

from __future__ import annotations

from typing import Any

import torch
from results import ResultRow

# workload -> (min ratio vs HF best static, min share of the floor)
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "W1": (3.0, 0.65),
    "W2": (None, 0.75),
    "W3": (5.0, None),
}


def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, medians."""
    import triton.testing

    def median_ms(fn: Any) -> float:
        return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))

    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: x @ y)
    src = dst = x = y = torch.empty(0)
    torch.cuda.empty_cache()
    return dict(copy_GBps=2 * 2**30 / copy_ms / 1e6, matmul_TFLOPs=2 * n**3 / mm_ms / 1e9)


def shape_numbers(shape: dict[str, Any], vocab: int = 128256, elem: int = 2) -> dict[str, float]:
    """Bytes and FLOPs of one model shape (bf16). Weights read per step exclude the embedding."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hq, hk, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    per_layer = h * (hq + 2 * hk) * d + hq * d * h + 3 * h * inter + 2 * h
    params = layers * per_layer + h + vocab * h  # + final norm + lm_head
    return dict(params=params, weight_bytes=params * elem, kv_bytes_per_token=2 * layers * hk * d * elem,
                layers=layers, attn_width=hq * d)


def w1_floor_tok_s(cfg: dict[str, float], ceil: dict[str, float], n: int, p: int, o: int) -> float:
    """Output tok/s if prefill ran at the matmul rate and every decode step at copy bandwidth.

    Prefill: 2 x parameters FLOPs per prompt token plus causal attention (4 x width FLOPs per
    visible query-key pair); it yields the first output token. Each of the other ``o - 1``
    decode steps reads the weights once and the K/V of every context token once.
    """
    flops = 2 * cfg["params"] * n * p + n * cfg["layers"] * 4 * cfg["attn_width"] * p * (p + 1) / 2
    t_prefill = flops / (ceil["matmul_TFLOPs"] * 1e12)
    kv_tokens = sum(n * (p + j) for j in range(1, o))
    decode_bytes = (o - 1) * cfg["weight_bytes"] + kv_tokens * cfg["kv_bytes_per_token"]
    t_decode = decode_bytes / (ceil["copy_GBps"] * 1e9)
    return n * o / (t_prefill + t_decode)


def w2_roofline_tok_s(cfg: dict[str, float], ceil: dict[str, float], p: int, o: int) -> float:
    """Batch-1 decode: copy bandwidth over (weights + the mean context's K/V) per token."""
    step_bytes = cfg["weight_bytes"] + (p + o / 2) * cfg["kv_bytes_per_token"]
    return ceil["copy_GBps"] * 1e9 / step_bytes


def _best_static(rows: list[ResultRow], workload: str) -> ResultRow | None:
    hf = [r for r in rows if r.workload == workload and r.engine.startswith("hf_generate_static")]
    return max(hf, key=lambda r: r.output_tok_s, default=None)


def markdown(rows: list[ResultRow], card: str, ceil: dict[str, float], commit: str) -> str:
    """The report: table with ratios, then each target as met / missed."""
    date = rows[0].date if rows else ""
    out = [
        "# GPU benchmarks: W1-W3, our engine vs HF transformers",
        "",
        f"**Card: {card}. Date {date}, commit `{commit[:12]}`, run `{rows[0].run_id if rows else ''}`.** "
        f"Measured ceilings: copy {ceil['copy_GBps']:,.0f} GB/s (read + write), "
        f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s. All engines in one process on this card.",
        "",
        "| workload | model | engine | output tok/s | vs HF static (best batch) | share of floor "
        "| $ per M output tokens | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        best = _best_static(rows, r.workload)
        ratio = f"{r.output_tok_s / best.output_tok_s:.2f}x" if best else ""
        floor = r.extra.get("floor_tok_s")
        share = f"{r.output_tok_s / floor:.0%} of {floor:,.0f}" if floor else ""
        cost = r.extra.get("cost_per_million_output_tokens_usd")
        price = r.extra.get("gpu_price_per_hour_usd")
        dollars = f"${cost:,.2f} at ${price}/GPU-h" if cost is not None else ""
        hidden = ("floor_tok_s", "share_of_floor", "cost_per_million_output_tokens_usd",
                  "gpu_price_per_hour_usd")
        notes = ", ".join(f"{k} {v}" for k, v in r.extra.items() if k not in hidden)
        out.append(f"| {r.workload} | {r.model_shape} | {r.engine} | {r.output_tok_s:,.0f} | {ratio} "
                   f"| {share} | {dollars} | {notes} |")
    out += ["", "## Targets (issue 5)", ""]
    for workload, (min_ratio, min_share) in TARGETS.items():
        ours = next((r for r in rows if r.workload == workload and r.engine == "llmserve"), None)
        if ours is None:
            continue
        best = _best_static(rows, workload)
        if min_ratio is not None and best is not None:
            times = ours.output_tok_s / best.output_tok_s
            verdict = "met" if times >= min_ratio else "MISSED"
            out.append(f"- {workload} {ours.model_shape}: {times:.2f}x HF static ({best.engine}), "
                       f"target {min_ratio:.0f}x: {verdict}")
        floor = ours.extra.get("floor_tok_s")
        if min_share is not None and floor:
            got = ours.output_tok_s / floor
            verdict = "met" if got >= min_share else "MISSED"
            out.append(f"- {workload} {ours.model_shape}: {got:.0%} of the floor ({floor:,.0f} tok/s), "
                       f"target {min_share:.0%}: {verdict}")
    return "\n".join(out) + "\n"
