"""W2's decode layer as the engine chains it at one token, timed in pieces (one CUDA GPU).

    python bench/w2_layer_chain.py [--parts pieces,attention,pdl] [--out FILE]

32 llama3-8b layers in one CUDA graph, every launch with PDL: fused add + RMSNorm, qkv, rotary
+ KV store, decode attention (one sequence, its own paged cache per layer), o, add + RMSNorm,
gate_up with SiLU-and-mul (gated), down; the one-token linears as the engine runs them (4-bit:
``wna16.one_token_gemv``, symmetric words in groups of 128; bf16: ``gemv16_linear``). Parts:

- ``pieces``: the whole chain, then without rotary, without rotary and attention, GEMVs only,
  and without the GEMVs (4-bit and bf16): what each piece costs where it sits in the chain,
  not alone;
- ``attention``: the decode attention's partition / keys-per-step / warps in the whole 4-bit
  chain at contexts of 64 and 160 tokens (W2 runs 33-160);
- ``pdl``: ``pdl.TRIGGER_FIRST`` on and off, alternating (DECISIONS 153);
- ``fused``: rotary + K/V store in the qkv GEMV's epilogue (4-bit and bf16;
  ``kernels.rope_store.RopeStore``) or its own launch, alternating.

Prints microseconds per layer (median of 20 graph replays / 32 layers); ``--out`` writes the rows
as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from bench_gemv import SHAPES_8B, time_chain, w4_layers  # bench/ is on sys.path as a script
from bench_kernels import LLAMA3_8B, make_paged

from kernels import triton_ops as tops
from kernels.triton_ops import gemv as G
from kernels.triton_ops import pdl, wna16
from kernels.triton_ops.norm import fused_add_rms_norm

DEV = "cuda"
LAYERS = 32
BLOCK = 16


class Chain:
    """The layers' weights (``fmt``: ``w4`` or ``bf16``) and their caches at context ``ctx``."""

    def __init__(self, fmt: str, ctx: int) -> None:
        self.fmt = fmt
        hq, hk, d = LLAMA3_8B["num_heads"], LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"]
        self.hq, self.hk, self.d, self.hidden = hq, hk, d, hq * d
        self.weights = [{name: self._weight(n, k) for name, (n, k) in SHAPES_8B.items()}
                        for _ in range(LAYERS)]
        self.set_context(ctx)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=DEV) / d))
        freqs = torch.outer(torch.arange(4096, dtype=torch.float32, device=DEV), inv_freq)
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.norm_w = torch.ones(self.hidden, device=DEV, dtype=torch.bfloat16)
        self.x0 = torch.randn(1, self.hidden, device=DEV, dtype=torch.bfloat16)
        self.out = torch.empty(1, hq, d, device=DEV, dtype=torch.bfloat16)

    def _weight(self, n: int, k: int) -> tuple[torch.Tensor, ...]:
        if self.fmt == "w4":
            return tuple(w4_layers(n, k, 1)[0])
        return (torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02,)

    def set_context(self, ctx: int) -> None:
        self.pages = [make_paged([(ctx, 1)], BLOCK) for _ in range(LAYERS)]
        self.slots = [(p.block_tables[0, (ctx - 1) // BLOCK] * BLOCK + (ctx - 1) % BLOCK).view(1).long()
                      for p in self.pages]
        self.positions = torch.tensor([ctx - 1], device=DEV)

    def linear(self, h: torch.Tensor, w: tuple[torch.Tensor, ...], gated: bool = False) -> torch.Tensor:
        if self.fmt == "w4":
            return wna16.one_token_gemv(h, w[0], w[1], None, 4, 128, None, pdl=True, gated=gated)
        return (G.gemv16_gated_linear if gated else G.gemv16_linear)(h, w[0], pdl=True)

    def step(self, rotary: bool = True, attention: bool = True, norms: bool = True, gemvs: bool = True,
             config: tops.DecodeConfig | None = None, fused: bool = False) -> Callable[[], torch.Tensor]:
        """The chain's run; ``fused``: rotary + K/V store in the qkv GEMV's epilogue."""
        hidden, kv = self.hidden, self.hk * self.d

        def run() -> torch.Tensor:
            h, res = self.x0.clone(), self.x0.clone()
            for w, p, slot in zip(self.weights, self.pages, self.slots, strict=True):
                if norms:
                    h, res = fused_add_rms_norm(h, res, self.norm_w, 1e-5, pdl=True)
                if fused:
                    rope = G.RopeStore(self.positions, self.cos_sin, p.key_cache, p.value_cache, slot,
                                       self.hq, self.hk, self.d)
                    qw = w["qkv"]
                    if self.fmt == "w4":
                        q = wna16.one_token_gemv(h, qw[0], qw[1], None, 4, 128, None, pdl=True, rope=rope)
                    else:
                        q = G.gemv16_rope_linear(h, qw[0], None, rope, pdl=True)
                    q = q.view(1, self.hq, self.d)
                    qkv = None
                else:
                    qkv = self.linear(h, w["qkv"]) if gemvs else None
                    q = qkv[:, :hidden].view(1, self.hq, self.d) if qkv is not None else p.q
                if rotary and not fused:
                    kv_heads = p.q[:, :self.hk]
                    k = kv_heads if qkv is None else qkv[:, hidden:hidden + kv].view(1, self.hk, self.d)
                    v = kv_heads if qkv is None else qkv[:, hidden + kv:].view(1, self.hk, self.d)
                    tops.rotary_store_kvcache(self.positions, q, k, v, self.cos_sin, p.key_cache,
                                              p.value_cache, slot, pdl=True)
                if attention:
                    tops.paged_decode_attention(q, p.key_cache, p.value_cache, p.block_tables, p.seq_lens,
                                                p.scale, 2048, out=self.out, pdl=True, config=config)
                    h = self.out.view(1, hidden)
                if gemvs:
                    h = self.linear(h, w["o"])
                if norms:
                    h, res = fused_add_rms_norm(h, res, self.norm_w, 1e-5, pdl=True)
                if gemvs:
                    h = self.linear(self.linear(h, w["gate_up"], gated=True), w["down"])
            return h
        return run


def us_per_layer(fn: Callable[[], torch.Tensor]) -> float:
    return time_chain(fn, reps=20) / LAYERS * 1e3


def part_pieces(rows: list[dict[str, Any]]) -> None:
    variants = {"whole": {}, "no rotary": dict(rotary=False),
                "no rotary, no attention": dict(rotary=False, attention=False),
                "GEMVs only": dict(rotary=False, attention=False, norms=False), "no GEMVs": dict(gemvs=False)}
    for fmt in ("w4", "bf16"):
        chain = Chain(fmt, 160)
        for rnd in range(3):
            for name, kw in variants.items():
                us = us_per_layer(chain.step(**kw))
                rows.append(dict(part="pieces", fmt=fmt, variant=name, round=rnd, us_per_layer=us))
                print(f"pieces {fmt} r{rnd} {name}: {us:.2f} us per layer", flush=True)
        del chain
        torch.cuda.empty_cache()


def part_attention(rows: list[dict[str, Any]]) -> None:
    chain = Chain("w4", 64)
    for ctx in (64, 160):
        chain.set_context(ctx)
        configs: dict[str, tops.DecodeConfig | None] = {"default": None}
        for part in (64, 128, 256, 2048):
            for bn in (32, 64, 128):
                for warps in (2, 4):
                    if part % bn == 0:
                        configs[f"{part},{bn},{warps}"] = tops.DecodeConfig(partition_size=part, block_n=bn,
                                                                            num_warps=warps)
        for rnd in range(2):
            for name, cfg in configs.items():
                us = us_per_layer(chain.step(config=cfg))
                rows.append(dict(part="attention", ctx=ctx, variant=name, round=rnd, us_per_layer=us))
                print(f"attention ctx {ctx} r{rnd} (partition, keys per step, warps) {name}: {us:.2f}",
                      flush=True)
        us = us_per_layer(chain.step(rotary=False, attention=False))
        rows.append(dict(part="attention", ctx=ctx, variant="no rotary, no attention", us_per_layer=us))
        print(f"attention ctx {ctx} without rotary and attention: {us:.2f}", flush=True)


def part_fused(rows: list[dict[str, Any]]) -> None:
    for fmt in ("w4", "bf16"):
        chain = Chain(fmt, 160)
        for rnd in range(3):
            for fused in ((False, True) if rnd % 2 == 0 else (True, False)):
                us = us_per_layer(chain.step(fused=fused))
                rows.append(dict(part="fused", fmt=fmt, fused_rope=fused, round=rnd, us_per_layer=us))
                print(f"fused {fmt} r{rnd} rotary in the qkv epilogue {fused}: {us:.2f}", flush=True)
        del chain
        torch.cuda.empty_cache()


def part_pdl(rows: list[dict[str, Any]]) -> None:
    default = pdl.TRIGGER_FIRST
    for fmt in ("w4", "bf16"):
        chain = Chain(fmt, 160)
        for rnd in range(3):
            for first in ((False, True) if rnd % 2 == 0 else (True, False)):
                pdl.TRIGGER_FIRST = first
                for name, kw in (("whole", {}), ("GEMVs and norms", dict(rotary=False, attention=False))):
                    us = us_per_layer(chain.step(**kw))
                    rows.append(dict(part="pdl", fmt=fmt, variant=name, trigger_first=first, round=rnd,
                                     us_per_layer=us))
                    print(f"pdl {fmt} r{rnd} trigger {'first' if first else 'after'} {name}: {us:.2f}",
                          flush=True)
        del chain
        torch.cuda.empty_cache()
    pdl.TRIGGER_FIRST = default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="pieces,attention,pdl")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    rows: list[dict[str, Any]] = []
    parts = {"pieces": part_pieces, "attention": part_attention, "pdl": part_pdl, "fused": part_fused}
    for part in args.parts.split(","):
        parts[part](rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
