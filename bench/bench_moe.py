"""Mixture-of-experts serving on one GPU, our engine against HF transformers in the same run
(DECISIONS 190).

``qwen3-30b-a3b``: Qwen3-MoE's shape (hidden 2048, 48 layers, 32 heads, 4 KV heads, 128 experts
of intermediate 768, top 8; 30.5 B parameters, 61 GB in bf16: one H100 or H200) with random bf16
weights. Workloads as bench_gpu's on this shape: ``W1`` (256 requests x 512 prompt tokens, 256
outputs each) and ``W2`` (one request, 32-token prompt, 128 outputs), our engine core after its
warm-up (bench_gpu's ``OurEngine``: CUDA graphs, async scheduling), HF's ``generate`` as
bench_gpu times it (W1 in static batches of 64). Prints tokens/s and our ratio to HF; with
``--bandwidth-gbs`` (the card's measured copy bandwidth: pass it, nothing is assumed) a W2 row
also carries its floor: the bytes one decode step reads (attention, the router, the 8 routed
experts of each layer, the LM head) at that bandwidth.

    python bench/bench_moe.py --commit <sha> --bandwidth-gbs 3000 --results docs/benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu import OurEngine, hf_model, hf_static, prompts_for  # noqa: E402
from bench.results import ResultRow, append_results, new_run_id, today  # noqa: E402

SHAPE = "qwen3-30b-a3b"
CONFIG: dict[str, Any] = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0, max_position_embeddings=32768,
    rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16",
    bos_token_id=151643, eos_token_id=151645, attention_bias=False,
)
WORKLOADS = {"W1": (256, 512, 256), "W2": (1, 32, 128)}  # requests, prompt tokens, output tokens


def decode_bytes_per_token() -> int:
    """Bytes one batch-1 decode step reads in bf16 (KV of a short context left out)."""
    h, layers, d = CONFIG["hidden_size"], CONFIG["num_hidden_layers"], CONFIG["head_dim"]
    q, kv = CONFIG["num_attention_heads"] * d, CONFIG["num_key_value_heads"] * d
    attention = h * (q + 2 * kv) + q * h
    experts = CONFIG["num_experts_per_tok"] * 3 * h * CONFIG["moe_intermediate_size"]
    router = CONFIG["num_experts"] * h
    return 2 * (layers * (attention + experts + router) + CONFIG["vocab_size"] * h)


def ours(model: Path, workload: str) -> float:
    n, p_len, o_len = WORKLOADS[workload]
    engine = OurEngine(model)
    try:
        engine.run(prompts_for(n, p_len, 98), 24 if n > 1 else o_len)  # warm-up at the shape
        result = engine.run(prompts_for(n, p_len, 7), o_len)
    finally:
        engine.close()
    return float(result["output_tokens"] / result["elapsed_s"])


def hf(model: Path, workload: str) -> float:
    n, p_len, o_len = WORKLOADS[workload]
    net = hf_model(model)
    try:
        result = hf_static(net, prompts_for(n, p_len, 7), min(n, 64), o_len, timed=1 if n == 1 else 2)
    finally:
        del net
        gc.collect()
        torch.cuda.empty_cache()
    return float(result["output_tokens"] / result["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--workloads", default="W2,W1")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="the card's measured copy bandwidth")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    folder = Path(tempfile.mkdtemp(prefix="bench-moe-")) / SHAPE
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    run_id, rows = new_run_id(), []
    for workload in args.workloads.split(","):
        rate = ours(folder, workload)
        extra: dict[str, Any] = {}
        line = f"{card} {workload} {SHAPE} llmserve {rate:10.1f} tok/s"
        if workload == "W2" and args.bandwidth_gbs:
            floor = args.bandwidth_gbs * 1e9 / decode_bytes_per_token()
            extra["floor_tok_s"], extra["fraction_of_floor"] = round(floor, 1), round(rate / floor, 4)
            line += f"  {rate / floor:.1%} of the {floor:,.0f} tok/s bandwidth floor"
        if not args.skip_hf:
            peer = hf(folder, workload)
            extra["hf_tok_s"], extra["ratio_to_hf"] = round(peer, 1), round(rate / peer, 3)
            line += f"  HF {peer:,.1f} tok/s  x{rate / peer:.2f}"
            rows.append(ResultRow(run_id, today(), args.commit, card, workload, SHAPE, "hf", peer, extra={}))
        print(line, flush=True)
        rows.append(ResultRow(run_id, today(), args.commit, card, workload, SHAPE, "llmserve", rate,
                              extra=extra))
    if args.results is not None:
        append_results(args.results, rows)


if __name__ == "__main__":
    main()
