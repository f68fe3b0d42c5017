"""Programmatic dependent launch (sm_90+, ``kernels/triton_ops/pdl.py``): the decode ops of
``triton_ops(pdl=True)`` give the bits of the plain launches, eagerly and replayed from a CUDA
graph, over a chain of decoder layers where every kernel may start while the one before it runs:
fused add + RMSNorm, the one-token linears (bf16, fp8 weight-only, 4-bit words; gate_up with
SiLU-and-mul; 4-bit also through the tensor-core GEMV, ``w4mma``, and with the word kernel's
first tile not peeled, ``w4unpeeled``), rotary + KV store into the paged cache (bf16 and fp8) and
split-KV decode attention (both phases), with the reads before the PDL wait (the attention's
L2 prefetch, rotary's early inputs) on and off. The KV caches the chain writes are compared too.

One command: ``python -m pytest -q tests/kernels/test_pdl_gpu.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from kernels import KernelOps, get_ops  # noqa: E402
from kernels import quant_reference as qref  # noqa: E402
from kernels.triton_ops import decode_attention, rotary_kv, triton_ops  # noqa: E402
from kernels.triton_ops import wna16 as wna16_module  # noqa: E402
from kernels.triton_ops.pdl import pdl_supported  # noqa: E402
from tests.kernels.quant_kernel_checks import random_wna16  # noqa: E402
from tests.kernels.test_pdl import DECODE_OPS  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not pdl_supported("cuda"), reason="programmatic dependent launch needs sm_90+"),
]

LAYERS = 4
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 1024, 8, 2, 128, 2816
BLOCK, CONTEXT, GROUP = 16, 700, 128  # 700 cached tokens: the decode attention splits (two phases)
EPS = 1e-5


@dataclass(frozen=True)
class Linear:
    """One projection's weight in one format, and how the op set applies it (plain or gated)."""

    fmt: str
    args: tuple[Any, ...]

    def __call__(self, ops: KernelOps, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        if self.fmt == "bf16":
            fn: Callable[..., torch.Tensor] | None = ops.linear16_gated if gated else ops.linear16
        elif self.fmt == "fp8":
            fn = ops.fp8_weight_only_gated_linear if gated else ops.fp8_weight_only_linear
        else:
            fn = ops.wna16_gated_linear if gated else ops.wna16_linear
        assert fn is not None
        return fn(x, *self.args)


def _linear(fmt: str, n: int, k: int, gen: torch.Generator) -> Linear:
    w = torch.randn(n, k, generator=gen) * 0.02
    if fmt == "bf16":
        return Linear(fmt, (w.to("cuda", torch.bfloat16),))
    if fmt == "fp8":
        q, s = qref.quantize_fp8_rows(w.to("cuda", torch.bfloat16))
        return Linear(fmt, (q, s.reshape(-1).contiguous()))
    w4 = random_wna16(n, k, 4, GROUP, False, torch.float16, "cuda", gen)  # w4, w4mma, w4unpeeled
    return Linear(fmt, (w4.qweight, w4.scales, w4.offsets, w4.bits, w4.group_size))


def _layers(fmt: str, gen: torch.Generator) -> list[dict[str, Linear]]:
    shapes = {"qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "o": (HIDDEN, HEADS * HEAD_DIM),
              "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
    return [{name: _linear(fmt, n, k, gen) for name, (n, k) in shapes.items()} for _ in range(LAYERS)]


@dataclass(frozen=True)
class Step:
    """One decode step's inputs: a sequence of ``CONTEXT`` cached tokens and its next token."""

    x: torch.Tensor
    norm_w: torch.Tensor
    cos_sin: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    kv_scales: dict[str, torch.Tensor]


def _step(kv_fp8: bool, gen: torch.Generator) -> Step:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    freqs = torch.outer(torch.arange(CONTEXT + 1, dtype=torch.float32), inv_freq)
    blocks = -(-(CONTEXT + 1) // BLOCK)
    table = torch.randperm(2 * blocks, generator=gen)[:blocks].to(torch.int32)
    slot = int(table[CONTEXT // BLOCK]) * BLOCK + CONTEXT % BLOCK
    scales = {"k_scale": torch.tensor([0.02], device="cuda"), "v_scale": torch.tensor([0.03], device="cuda")}
    return Step(
        x=(torch.randn(1, HIDDEN, generator=gen)).to("cuda", torch.bfloat16),
        norm_w=(1.0 + 0.1 * torch.randn(HIDDEN, generator=gen)).to("cuda", torch.bfloat16),
        cos_sin=torch.cat((freqs.cos(), freqs.sin()), dim=-1).to("cuda"),
        positions=torch.tensor([CONTEXT], device="cuda"),
        slots=torch.tensor([slot], device="cuda"),
        block_tables=table.view(1, -1).to("cuda"),
        seq_lens=torch.tensor([CONTEXT + 1], dtype=torch.int32, device="cuda"),
        kv_scales=scales if kv_fp8 else {},
    )


def _caches(kv_fp8: bool, gen: torch.Generator) -> list[torch.Tensor]:
    shape = (2 * -(-(CONTEXT + 1) // BLOCK), BLOCK, KV_HEADS, HEAD_DIM)
    caches = [torch.randn(shape, generator=gen).to("cuda", torch.bfloat16) for _ in range(2 * LAYERS)]
    return [c.to(torch.float8_e4m3fn) for c in caches] if kv_fp8 else caches


def _decode(ops: KernelOps, layers: list[dict[str, Linear]], s: Step,
            caches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token through every layer (the model's order of ops); returns ``(h, residual)``."""
    h, res = s.x.clone(), s.x.clone()
    q_end, k_end = HEADS * HEAD_DIM, (HEADS + KV_HEADS) * HEAD_DIM
    for i, w in enumerate(layers):
        h, res = ops.fused_add_rms_norm(h, res, s.norm_w, EPS)
        qkv = w["qkv"](ops, h)
        q = qkv[:, :q_end].view(1, HEADS, HEAD_DIM)
        k = qkv[:, q_end:k_end].view(1, KV_HEADS, HEAD_DIM)
        v = qkv[:, k_end:].view(1, KV_HEADS, HEAD_DIM)
        kc, vc = caches[2 * i], caches[2 * i + 1]
        assert ops.rotary_store_kvcache is not None
        q = ops.rotary_store_kvcache(s.positions, q, k, v, s.cos_sin, kc, vc, s.slots, **s.kv_scales)
        a = ops.paged_decode_attention(q, kc, vc, s.block_tables, s.seq_lens, HEAD_DIM**-0.5, CONTEXT + 1,
                                       **s.kv_scales)
        h = w["o"](ops, a.view(1, -1))
        h, res = ops.fused_add_rms_norm(h, res, s.norm_w, EPS)
        h = w["down"](ops, w["gate_up"](ops, h, gated=True))
    return ops.rms_norm(h, s.norm_w, EPS), res


def _mma_for_words(calls: list[int]) -> Any:
    """A stand-in for ``gemv_wna16`` (symmetric 4-bit, as ``_layers`` makes them) that runs the
    tensor-core GEMV instead, which the dispatch takes from two tokens on."""
    def run(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, offsets: None, bits: int, group: int,
            bias: torch.Tensor | None = None, *, gated: bool = False, pdl: bool = False,
            **_: Any) -> torch.Tensor:
        calls.append(1)
        return wna16_module.gemv_int4_mma(x, q, s, group, bias, gated=gated, pdl=pdl)
    return run


@pytest.mark.parametrize(("fmt", "kv_fp8"), [("bf16", False), ("fp8", True), ("w4", False), ("w4mma", False),
                                             ("w4unpeeled", False), ("bf16-early", False),
                                             ("fp8-early", True), ("bf16-late", False)])
def test_pdl_decode_chain_is_bit_for_bit_the_plain_launches_gpu(fmt: str, kv_fp8: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``-early`` / ``-late``: the reads before the PDL wait (the decode attention's L2 prefetch,
    rotary's position, slot and cos/sin) on / off, whatever the defaults."""
    calls: list[int] = []
    fmt, _, reads = fmt.partition("-")
    if reads:
        monkeypatch.setattr(decode_attention, "_PREFETCH", reads == "early")
        monkeypatch.setattr(rotary_kv, "_EARLY_INPUTS", reads == "early")
    if fmt == "w4mma":  # the tensor-core 4-bit GEMV in every 4-bit linear of the one-token chain
        monkeypatch.setattr(wna16_module, "gemv_wna16", _mma_for_words(calls))
    if fmt == "w4unpeeled":  # the word kernel without its first tile peeled (peeled by default)
        words = wna16_module.gemv_wna16
        monkeypatch.setattr(wna16_module, "gemv_wna16",
                            lambda *a, **kw: calls.append(1) or words(*a, **{**kw, "peel": False}))
    gen = torch.Generator().manual_seed(3)
    layers, step, caches0 = _layers(fmt, gen), _step(kv_fp8, gen), _caches(kv_fp8, gen)
    plain, chained = triton_ops(pdl=False), triton_ops(pdl=True)
    ref_caches = [c.clone() for c in caches0]
    ref = _decode(plain, layers, step, ref_caches)
    eager_caches = [c.clone() for c in caches0]
    eager = _decode(chained, layers, step, eager_caches)

    graph_caches = [c.clone() for c in caches0]
    _decode(chained, layers, step, graph_caches)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _decode(chained, layers, step, graph_caches)
    for got_outputs, got_caches, how in ((eager, eager_caches, "eager"), (captured, graph_caches, "graph")):
        if how == "graph":
            for c, c0 in zip(graph_caches, caches0, strict=True):
                c.copy_(c0)
            for _ in range(3):  # replays over the caches the capture wrote: each writes the same slot
                graph.replay()
            torch.cuda.synchronize()
        for got, want, name in zip(got_outputs, ref, ("h", "residual"), strict=True):
            assert torch.equal(got, want), f"{fmt} {how}: {name} differs from the plain launches"
        for i, (got, want) in enumerate(zip(got_caches, ref_caches, strict=True)):
            same = torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            assert same, f"{fmt} {how}: cache {i} differs"
    assert (fmt in ("w4mma", "w4unpeeled")) == bool(calls)


def test_get_ops_launches_decode_ops_with_pdl_unless_told_not_to_gpu() -> None:
    """On this card ``get_ops`` hands out the chained set (which ops: ``test_pdl.py``)."""
    eager, chained = get_ops("cuda", pdl=False), get_ops("cuda")
    for name in DECODE_OPS:
        assert getattr(chained, name).keywords == {"pdl": True}, name
        assert not hasattr(getattr(eager, name), "keywords"), name
    # Prefill and multi-token ops keep plain launches.
    assert not hasattr(chained.paged_attention, "keywords")
    assert not hasattr(chained.fp8_linear, "keywords")
