"""The tensor-core 4-bit GEMV (``kernels/triton_ops/wna16_mma.py``) without a GPU.

- Its inline PTX, run by a small interpreter of the instructions it uses: every lane of one warp
  executes the block program in lockstep, ``mma.sync`` as the PTX ISA defines its m16n8k16
  fragments. Each lane's inputs are built from a random block by the kernel's own lane layout
  (words ``4t .. 4t + 3`` of rows ``g`` and ``g + 8``, token ``g``'s inputs of the same span), and
  every output element must be ``scale[row] * sum_k (q[row, k] - 8) x[token, k]`` for the row and
  token the module docstring assigns it: this checks the shipped assembly text, its pairing of
  nibbles, inputs and fragment slots, and the lane layout together.
- The Triton kernel's layout assumption: compiled for sm_90 with the installed Triton, the inline
  assembly's operands are 4 consecutive elements per thread along the 128 columns, the 32 lanes
  of a warp along the columns, the warps along the rows (no shared-memory hop in the loop).
- The whole kernel against the torch reference in the CPU interpreter is in
  ``quant_kernel_checks.check_gemv_int4_mma``: ``mode="model"`` runs the assembly path's own loads
  with the assembly replaced by a Triton model of what this file checks it computes, so the
  loads' addresses, the lane layout's convention and the epilogue are covered there.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.triton_ops import wna16_mma  # noqa: E402
from tests.kernels.ptx_model import _LANES, MODELLED, opcodes, run_ptx  # noqa: E402
from tests.kernels.sm90 import compile_sm90_or_skip  # noqa: E402


def run_block_ptx(ptx: str, operands: dict[int, np.ndarray], memory: bytes) -> list[np.ndarray]:
    """The block program for one warp (:func:`run_ptx`): ``operands`` ``$4`` .. ``$31`` per lane
    (``$28`` .. ``$31`` byte addresses into ``memory``); ``$0`` .. ``$3`` as float32 per lane."""
    regs = run_ptx(ptx, operands, memory)
    return [regs[f"${i}"].view(np.float32) for i in range(4)]

def _lane_inputs(words: np.ndarray, x_bits: np.ndarray, m: int) -> dict[int, np.ndarray]:
    """The kernel's per-lane operands for one block: ``words`` ``[16, 16]`` (16 rows, the block's
    16 words each; rows a are 0-7, rows b 8-15), ``x_bits`` ``[8, 64]`` (each token's 128 16-bit
    inputs as 64 pairs); tokens ``>= m`` read token ``m - 1`` (the kernel's clamp)."""
    ops: dict[int, np.ndarray] = {}
    lane = np.arange(_LANES)
    g, t = lane // 4, lane % 4
    tok = np.minimum(g, m - 1)
    for e in range(4):
        ops[4 + e] = words[g, 4 * t + e]  # row a
        ops[8 + e] = words[g + 8, 4 * t + e]  # row b
        for u in range(4):
            ops[12 + 4 * u + e] = x_bits[tok, 16 * t + 4 * u + e]
    return ops


_ACT_CASES = [("bf16", True), ("bf16", False), ("fp16", False)]


@pytest.mark.parametrize("offsets", [False, True], ids=["symmetric", "offsets"])
@pytest.mark.parametrize(("act", "sub_mma"), _ACT_CASES, ids=["bf16-sub_mma", "bf16-sub_fma", "fp16-sub_fma"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_block_assembly_sums_each_lane_element(scale_dtype: torch.dtype, m: int, act: str,
                                               sub_mma: bool, offsets: bool) -> None:
    gen = torch.Generator().manual_seed(m)
    q = torch.randint(0, 16, (16, 128), generator=gen)
    words = np.zeros((16, 16), dtype=np.uint32)
    for i in range(8):  # input 8 j + i in bits 4 i .. 4 i + 3 of word j
        words |= (q[:, i::8].numpy().astype(np.uint32) << (4 * i))
    x = torch.randn(8, 128, generator=gen).to(torch.bfloat16 if act == "bf16" else torch.float16)
    x_bits = x.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
    x_pairs = x_bits[:, 0::2] | (x_bits[:, 1::2] << 16)
    scales = (torch.rand(16, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    offs = (torch.randn(16, generator=gen) * 0.05).to(scale_dtype)  # asymmetric: q * scale + offset
    memory = scales.view(torch.uint8).numpy().tobytes() + offs.view(torch.uint8).numpy().tobytes()
    size = scales.element_size()
    ops = _lane_inputs(words, x_pairs, m)
    g = np.arange(_LANES) // 4
    for e in range(4):  # element e of a lane: row half e // 2 (the kernel's s_addr, o_addr)
        ops[28 + e] = ((g + 8 * (e // 2)) * size).astype(np.uint32)
        if offsets:
            ops[32 + e] = ops[28 + e] + np.uint32(16 * size)
    ptx = wna16_mma._mma_ptx("fp16" if scale_dtype == torch.float16 else "fp32", sub_mma, act, offsets)
    got = run_block_ptx(ptx, ops, memory)
    if offsets:
        w = q.double() * scales.double()[:, None] + offs.double()[:, None]
        want = w @ x.double().t()  # [16 rows, 8 tokens]
    else:
        want = (scales.double()[:, None] * ((q.double() - 8.0) @ x.double().t()))  # [16 rows, 8 tokens]
    # Each mma rounds its float32 sums, the - 136 x terms included: a few units of 2^-24 of
    # 136 * sum |x| per token (a wrong pairing is off by far more: the values are about 0.1-1);
    # with offsets also of (8 scale + |offset|) * sum |x|.
    coef = 136 * scales.double() + (offs.double().abs() if offsets else 0.0)
    bound = (2.0**-20 * coef[:, None] * x.double().abs().sum(dim=1)[None, :]).numpy()
    lane = np.arange(_LANES)
    for e in range(4):
        rows = lane // 4 + 8 * (e // 2)
        toks = 2 * (lane % 4) + e % 2
        real = toks < m
        expect = want[rows, np.minimum(toks, m - 1)].numpy()
        err = np.abs(got[e].astype(np.float64) - expect)
        assert (err[real] <= bound[rows, np.minimum(toks, m - 1)][real]).all(), (e, err[real].max())


def test_block_assembly_uses_only_the_modelled_instructions() -> None:
    """Every opcode of the shipped assembly is one the interpreter above models (a new one would
    otherwise fail there only for the lines it reaches)."""
    ops = set()
    for dtype, (act, sub_mma), off in ((d, case, o) for d in ("fp16", "fp32") for case in _ACT_CASES
                                       for o in (False, True)):
        ops |= opcodes(wna16_mma._mma_ptx(dtype, sub_mma, act, off))
    assert ops == {"mov.f32", "mov.b32", "prmt.b32", "lop3.b32", "fma.rn.bf16x2", "fma.rn.f16x2",
                   "shr.u32",
                   "ld.global.nc.b16", "ld.global.nc.f32", "cvt.f32.f16", "mul.f32", "fma.rn.f32",
                   "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                   "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"}
    assert ops <= MODELLED
    with pytest.raises(ValueError, match="FMA"):
        wna16_mma._mma_ptx("fp16", True, "fp16")


def _compile_sm90(warps: int, bpi: int, gated: bool, sub_mma: bool, f16: bool = False,
                  offsets: bool = False) -> str:
    fn = wna16_mma._gemv_int4_mma_kernel
    ptrs = dict(x_ptr="i32", q_ptr="i32", s_ptr="fp16", o_ptr="fp16", bias_ptr="fp16",
                out_ptr="fp16" if f16 else "bf16")
    consts = dict(GROUP=128, BPI=bpi, WARPS=warps, GATED=gated, HAS_BIAS=False, EVEN=True, MODE=1,
                  PTX=wna16_mma._BLOCK_PTX[(False, sub_mma, f16, offsets)], PREFETCH=True, PDL=False,
                  HAS_OFFSET=offsets)
    kernel = compile_sm90_or_skip(fn, ptrs, consts, num_warps=warps)
    return kernel.asm["ttgir"]


@pytest.mark.parametrize(("warps", "bpi", "gated", "sub_mma", "f16", "offsets"),
                         [(4, 2, False, True, False, False), (8, 1, True, False, False, False),
                          (4, 2, False, False, True, False), (4, 2, False, True, False, True)])
def test_assembly_operands_get_the_lane_layout(warps: int, bpi: int, gated: bool, sub_mma: bool,
                                               f16: bool, offsets: bool) -> None:
    ttgir = _compile_sm90(warps, bpi, gated, sub_mma, f16, offsets)
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<\{.*\}>)", ttgir, re.M))
    asm = [line for line in ttgir.splitlines() if "tt.elementwise_inline_asm" in line]
    assert len(asm) == 2  # the peeled first iteration and the loop's
    used = {layout for line in asm for layout in re.findall(r"tensor<\d+x128x\w+, (#\w+)>", line)}
    assert len(used) == 1, used
    layout = layouts[used.pop()]
    assert "sizePerThread = [1, 4]" in layout and "threadsPerWarp = [1, 32]" in layout, layout
    assert f"warpsPerCTA = [{warps}, 1]" in layout and "order = [1, 0]" in layout, layout
    loop = ttgir[ttgir.index("scf.for"): ttgir.index("scf.yield")]
    assert "ttg.convert_layout" not in loop and "ttg.local_" not in loop


def test_mma_applies_only_where_the_assembly_holds() -> None:
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    q = torch.zeros(32, 128, dtype=torch.uint8)
    assert not wna16_mma.mma_applies(x, q, None, 4, 128)  # CPU
    with pytest.raises(ValueError, match="M <= 8"):
        wna16_mma.gemv_int4_mma(torch.zeros(9, 256), q, torch.ones(32, 2), 128, mode="sums")
    with pytest.raises(ValueError, match="multiples of 128"):
        wna16_mma.gemv_int4_mma(torch.zeros(1, 256), q, torch.ones(32, 4), 64, mode="sums")
    for dtype, mode in ((torch.float32, "model"), (torch.float16, "model"), (torch.float32, "asm")):
        with pytest.raises(ValueError, match="does not take"):  # the model is bf16's; the assembly 16-bit
            wna16_mma.gemv_int4_mma(torch.zeros(1, 256, dtype=dtype), q, torch.ones(32, 2), 128, mode=mode)
