"""Tensor-core GEMV for symmetric 4-bit weights at one to eight tokens: ``mma.sync`` on nibbles
made bf16 in registers, in the weights' own int32-word layout.

Why: at one token the CUDA-core word kernel (:func:`kernels.triton_ops.gemv.gemv_wna16`) is bound
by instruction issue, not by DRAM: about 3.4 instructions per weight with its packed bf16 decode
(DECISIONS 111, 132). A ``tl.dot`` of the dequantized tile measured slower still, because the
tile reached the tensor cores through shared memory (DECISIONS 111). Here each lane decodes
exactly the weights its own ``mma.m16n8k16`` fragment holds, so nothing moves between lanes
but the ``mma`` itself: about 1.6 instructions per weight in the block's PTX, 2.0-2.1 in the
sm_90 loop (Triton 3.4-3.9, DECISIONS 135).

The lane layout (one warp, one block of 128 inputs ``k``, 16 weight rows, up to 8 tokens). Lane
``(g, t)`` (``g = lane // 4``, ``t = lane % 4``) loads words ``4 t .. 4 t + 3`` of the block
(inputs ``32 t .. 32 t + 31``) of two rows, "row a" and "row b" (``_row``: rows ``g`` and
``g + 8`` of the program's 16; gated, gate row ``o`` and up row ``o + N / 2``), and the same 32
inputs of token ``g`` (token ``M - 1``'s for ``g >= M``: those sums are never stored). In word
``w``, input ``8 w + i`` is nibble ``i``;
``(w >> 4 i) & 0x000F000F | 0x43004300`` is the bf16 pair ``(128 + q_i, 128 + q_{i+4})`` (one
LOP3), and ``prmt`` pairs the inputs the same way, ``(x_i, x_{i+4})``. An ``mma`` sums over 16
fragment columns; lane ``(g, t)`` holds columns ``2 t, 2 t + 1, 2 t + 8, 2 t + 9`` of rows ``g``
and ``g + 8`` of ``A`` and the same columns (as ``B``'s rows) of token ``g``, so mapping them to
four of the lane's own inputs is one permutation of ``k`` shared by ``A`` and ``B``: the product
is unchanged. Word ``u`` of the lane feeds two ``mma``: pairs 0 and 1, then pairs 2 and 3. The
``- 136`` that makes ``128 + q`` into ``q - 8`` is one more ``mma`` per input pair, of a constant
``A`` of ``-136`` with the same ``B`` (cheaper than a subtract per weight pair). The accumulator
``D`` (float32, 16 rows x 8 tokens) leaves lane ``(g, t)`` as rows ``g`` and ``g + 8``, tokens
``2 t`` and ``2 t + 1``: element ``e`` is row half ``e // 2`` and token ``2 t + e % 2``.

The inline assembly is written as elementwise on ``[blocks, 128]`` tensors with ``pack=4``
(column ``c`` is element ``c % 4`` of lane ``c // 4``), so it is correct only in the layout the
loads give those tensors: four consecutive columns per thread, a warp's 32 threads along the
columns, the warps along the rows. ``tests/kernels/test_wna16_mma.py`` compiles the kernel for
sm_90 and checks that layout in Triton's IR, and runs the PTX itself lane by lane. On the CPU
interpreter ``mode="model"`` runs the same loads with the assembly replaced by its model in
Triton ops (:func:`_mma_block_model`), ``mode="sums"`` sums each block's products directly
(:func:`_block_sums`). Products are exact (bf16 ``q - 8`` times a bf16 input) and sums are
float32: more accurate than the packed bf16 CUDA-core decode. float16 inputs take the same
program with float16 pairs (``0x6400 | q`` is ``1024 + q``, a packed FMA makes it ``q - 8``)
and float16 ``mma`` (DECISIONS 138).

Each program owns 16 rows (8 gated outputs) and its warps split ``K`` in blocks of 128 inputs,
``BPI`` blocks per warp per loop iteration; the block's group scale multiplies its sums, the warps'
sums meet in one reduction at the end. Symmetric weights, or asymmetric ones (offsets: each
token's sum of the block's inputs from one more ``mma`` of a constant ``A`` of ones, times
``8 scale + offset``), group sizes that are multiples of 128, bf16 or float16 inputs, ``N`` a
multiple of 16, ``M <= 8``: :func:`mma_applies`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_ops.activation import silu_mul_tile
from kernels.triton_ops.pdl import pdl_begin, pdl_launch

MMA_K = 128  # inputs per block: 4 lanes x 4 words x 8 nibbles
MMA_MAX_M = 8  # tokens: the mma's 8 columns


@dataclass(frozen=True)
class MmaTiles:
    """Warps per program (each takes every ``warps``-th block of 128 inputs), blocks each warp
    loads per loop iteration, how the assembly subtracts the nibbles' 136 (``sub_mma``: a
    constant-A ``mma``, else a bf16 FMA per weight pair; :func:`_mma_ptx`), and ``prefetch``:
    the first iteration's weights are read before the PDL wait."""

    warps: int = 4
    blocks_per_iter: int = 2
    sub_mma: bool = True
    prefetch: bool = True

    def __post_init__(self) -> None:
        for name in ("warps", "blocks_per_iter"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")


def mma_tiles(n: int, k: int) -> MmaTiles:
    """The tiling for ``[n, k]`` weights: eight warps where the grid is short (at most 4,096 rows:
    256 programs of 16 rows), four otherwise, so an H100/H200 has at least 2,048 warps of loads
    in flight either way. Not yet measured on a card (docs/QUANTIZATION.md, Not done)."""
    return MmaTiles(warps=8 if n <= 4096 else 4, blocks_per_iter=2)


def mma_applies(x: torch.Tensor, qweight: torch.Tensor, offsets: torch.Tensor | None, bits: int,
                group_size: int, scales: torch.Tensor | None = None) -> bool:
    """Whether :func:`gemv_int4_mma` takes this product: CUDA with ``mma.sync`` bf16 (sm_80+), bf16
    or float16 ``x`` ``[M, K]`` with ``M <= 8``, symmetric 4-bit weights, groups of a multiple of
    128 inputs, 16-row blocks, and the alignment the assembly's lane layout needs (:func:`_aligned`)."""
    if not x.is_cuda or x.dtype not in _ASM_DTYPES or bits != 4 or x.dim() != 2:
        return False
    if offsets is not None and (scales is None or not offsets_fit(scales, offsets)):
        return False
    if not _shape_ok(x, qweight, group_size) or not _aligned(x, qweight):
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def offsets_fit(scales: torch.Tensor, offsets: torch.Tensor) -> bool:
    """Offsets the kernel reads with the scales' addressing: same dtype, shape and strides."""
    return (offsets.dtype == scales.dtype and offsets.shape == scales.shape
            and offsets.stride() == scales.stride())


def _shape_ok(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    """``M <= 8`` tokens, ``K`` and the group a multiple of 128 inputs, 16-row blocks."""
    m, k = x.shape
    n = qweight.shape[0]
    return 1 <= m <= MMA_MAX_M and k % MMA_K == 0 and group_size % MMA_K == 0 and n % 16 == 0


def _aligned(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """16-byte aligned bases and row strides that are multiples of 16 of the kernel's units (int32
    input pairs, int32 words): Triton then specializes the kernel so that every load of the loop
    gets the lane layout (four 16-byte vectors per thread). Without it a load could get another
    layout and the assembly, which is not elementwise across lanes, would read wrong operands."""
    return (x.stride(1) == 1 and x.stride(0) % 32 == 0 and x.data_ptr() % 16 == 0
            and qweight.element_size() == 1 and qweight.stride(1) == 1 and qweight.stride(0) % 64 == 0
            and qweight.data_ptr() % 16 == 0)


# One block (16 rows x 128 inputs x 8 tokens) per lane-quad of four consecutive elements:
# $0-$3 the float32 sums out; $4-$7 row a's words, $8-$11 row b's, then the inputs of word u
# (u = 0..3) as bf16 pairs (x_{8u}, x_{8u+1}) .. (x_{8u+6}, x_{8u+7}) in $12+4u .. $15+4u, then
# $28-$31 the addresses (int64) of the four elements' scales (rows a, a, b, b).
# B pair r of a word from its input registers (x_0, x_1), (x_2, x_3), (x_4, x_5), (x_6, x_7):
# prmt of registers lo and hi, low halves (0x5410) or high halves (0x7632): (x_r, x_{r+4}).
_B_PAIRS = ((0, 2, "0x5410"), (0, 2, "0x7632"), (1, 3, "0x5410"), (1, 3, "0x7632"))


# Per input type: the mma's operand type, the OR that makes nibble q the 16-bit pair of
# (bias + q) (bf16: 128 + q, float16: 1024 + q, both exact), the pair (-bias - 8, -bias - 8) that
# makes it q - 8, and the pair (1, 1).
_ACT = {"bf16": ("bf16", "0x43004300", "0xC308C308", "0x3F803F80"),
        "fp16": ("f16", "0x64006400", "0xE408E408", "0x3C003C00")}


def _mma_ptx(scale_dtype: str, sub_mma: bool = True, act: str = "bf16", offsets: bool = False) -> str:
    """The block program (operands above) for ``float16`` or ``float32`` scales and ``bf16`` or
    ``fp16`` inputs; ``sub_mma``: the ``- 136`` as one constant-A ``mma`` per input pair, else as
    a packed FMA per weight pair (``128 + q - 136``, exact): one more ``mma`` per word of
    weights, or four more FMAs. fp16 inputs take the FMA only: their constant-A form would
    subtract ``1032 x`` from ``1024 x``-sized sums in float32 (a cancellation of about 7 bits).
    ``offsets`` (asymmetric weights, ``q * scale + offset`` with ``q`` in 0..15): the block's
    inputs are also summed per token by an ``mma`` of a constant ``A`` of ones (``D'``, every row
    the token's ``sum x``), the offsets read from ``$32 .. $35`` (the scales' dtype), and each
    element is ``scale * sum (q - 8) x + (8 scale + offset) * sum x``."""
    if act == "fp16" and sub_mma:
        raise ValueError("fp16 inputs subtract with the FMA (sub_mma=False)")
    typ, bias_or, kc, one = _ACT[act]

    def mma(a: str, b: str, d: str = "$0, $1, $2, $3") -> str:
        return (f"mma.sync.aligned.m16n8k16.row.col.f32.{typ}.{typ}.f32 {{{d}}}, "
                f"{{{a}}}, {{{b}}}, {{{d}}};")

    def pairs(dst: tuple[str, str], shift: int) -> list[str]:
        # (128 + q_i, 128 + q_{i+4}) of rows a and b, i = shift / 4 (then - 136 unless sub_mma)
        out = []
        for d, w, tmp in zip(dst, ("{wa}", "{wb}"), ("ta", "tb"), strict=True):
            src = w
            if shift:
                out.append(f"shr.u32 {tmp}, {w}, {shift};")
                src = tmp
            out.append(f"lop3.b32 {d}, {src}, 0x000F000F, {bias_or}, 0xEA;")
            if not sub_mma:
                out.append(f"fma.rn.{typ}x2 {d}, {d}, one, kc;")
        return out

    b = [[f"b{u}{r}" for r in range(4)] for u in range(4)]
    lines = ["{", ".reg .b32 a0, a1, a2, a3, ta, tb, kc, one, " + ", ".join(sum(b, [])) + ";",
             ".reg .f32 sa, sb;", ".reg .b16 ha, hb;",
             "mov.f32 $0, 0f00000000;", "mov.f32 $1, 0f00000000;",
             "mov.f32 $2, 0f00000000;", "mov.f32 $3, 0f00000000;",
             f"mov.b32 kc, {kc};",  # the pair (-136, -136) (fp16: -1032)
             f"mov.b32 one, {one};"]  # (1, 1)
    for u in range(4):  # word u's inputs as B pairs (x_0, x_4), (x_1, x_5), (x_2, x_6), (x_3, x_7)
        x = [f"${12 + 4 * u + r}" for r in range(4)]
        for r, (lo, hi, sel) in enumerate(_B_PAIRS):
            lines.append(f"prmt.b32 {b[u][r]}, {x[lo]}, {x[hi]}, {sel};")
    # -136 x over every input first: the constant A is live only here (fewer register copies).
    for u in range(4 if sub_mma else 0):
        lines += [mma("kc, kc, kc, kc", f"{b[u][0]}, {b[u][1]}")]
        lines += [mma("kc, kc, kc, kc", f"{b[u][2]}, {b[u][3]}")]
    if offsets:  # each token's sum x (every row of D'), from a constant A of ones
        lines[1:1] = [".reg .f32 d0, d1, d2, d3, oa, ob, za, zb;"]
        lines += ["mov.f32 d0, 0f00000000;", "mov.f32 d1, 0f00000000;",
                  "mov.f32 d2, 0f00000000;", "mov.f32 d3, 0f00000000;"]
        for u in range(4):
            lines += [mma("one, one, one, one", f"{b[u][0]}, {b[u][1]}", "d0, d1, d2, d3"),
                      mma("one, one, one, one", f"{b[u][2]}, {b[u][3]}", "d0, d1, d2, d3")]
    for u in range(4):
        words = dict(wa=f"${4 + u}", wb=f"${8 + u}")
        body = pairs(("a0", "a1"), 0) + pairs(("a2", "a3"), 4)
        body.append(mma("a0, a1, a2, a3", f"{b[u][0]}, {b[u][1]}"))  # pairs 0 and 1
        body += pairs(("a0", "a1"), 8) + pairs(("a2", "a3"), 12)
        body.append(mma("a0, a1, a2, a3", f"{b[u][2]}, {b[u][3]}"))  # pairs 2 and 3
        lines += [line.format(**words) if "{w" in line else line for line in body]
    # The block's group scale of rows a and b ($28 and $30: the addresses of elements 0 and 2).
    def group_loads(ra: str, rb: str, addr_a: str, addr_b: str) -> list[str]:
        if scale_dtype == "fp32":
            return [f"ld.global.nc.f32 {ra}, [{addr_a}];", f"ld.global.nc.f32 {rb}, [{addr_b}];"]
        return [f"ld.global.nc.b16 ha, [{addr_a}];", f"ld.global.nc.b16 hb, [{addr_b}];",
                f"cvt.f32.f16 {ra}, ha;", f"cvt.f32.f16 {rb}, hb;"]

    lines += group_loads("sa", "sb", "$28", "$30")
    lines += ["mul.f32 $0, $0, sa;", "mul.f32 $1, $1, sa;", "mul.f32 $2, $2, sb;", "mul.f32 $3, $3, sb;"]
    if offsets:  # + (8 scale + offset) * sum x
        lines += group_loads("oa", "ob", "$32", "$34")
        lines += ["fma.rn.f32 za, sa, 0f41000000, oa;", "fma.rn.f32 zb, sb, 0f41000000, ob;",
                  "fma.rn.f32 $0, d0, za, $0;", "fma.rn.f32 $1, d1, za, $1;",
                  "fma.rn.f32 $2, d2, zb, $2;", "fma.rn.f32 $3, d3, zb, $3;"]
    lines.append("}")
    return "\n".join(lines)


# The block program by (float32 scales, sub_mma, fp16 inputs, offsets); the launch picks one.
_BLOCK_PTX = {(f32, sub, f16, off): _mma_ptx("fp32" if f32 else "fp16", sub, "fp16" if f16 else "bf16", off)
              for f32 in (False, True) for sub in (False, True) for f16 in (False, True)
              for off in (False, True) if not (sub and f16)}
# pack=4: four float32 sums out, then four of each int32 input (words a, words b, the four
# input-pair tensors), then four int64 scale addresses (and four offset addresses).
_MMA_CONSTRAINTS = tl.constexpr("=f,=f,=f,=f" + ",r" * 24 + ",l" * 4)
_MMA_CONSTRAINTS_OFFSETS = tl.constexpr("=f,=f,=f,=f" + ",r" * 24 + ",l" * 8)


@triton.jit
def _mma_block_asm(wa, wb, x0, x1, x2, x3, s_addr, PTX: tl.constexpr):
    """Each lane-quad's block sums (module docstring) from its words and input pairs, times the
    block's scales, read by the assembly from ``s_addr`` (their addresses as int64) so that no
    tensor outside the lane layout meets the sums (a scale tensor loaded by Triton may get a
    layout of its own and move the sums through shared memory). ``PTX``: the block program for
    the scales' dtype and the subtract (``_BLOCK_PTX``, :func:`_mma_ptx`)."""
    return tl.inline_asm_elementwise(PTX, _MMA_CONSTRAINTS, [wa, wb, x0, x1, x2, x3, s_addr],
                                     dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _mma_block_asm_offsets(wa, wb, x0, x1, x2, x3, s_addr, o_addr, PTX: tl.constexpr):
    """:func:`_mma_block_asm` for asymmetric weights: the offsets read from ``o_addr`` too."""
    return tl.inline_asm_elementwise(PTX, _MMA_CONSTRAINTS_OFFSETS, [wa, wb, x0, x1, x2, x3, s_addr, o_addr],
                                     dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _mma_block_model(wa, wb, x0, x1, x2, x3, s, o, R: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """What :func:`_mma_block_asm` returns, from the same lane tensors, in Triton ops the CPU
    interpreter runs (``mode="model"``): the loads, the lane layout and the epilogue of the
    assembly path are then checked on the CPU too; the assembly itself is checked against this
    layout by running its PTX (``tests/kernels/test_wna16_mma.py``). ``s``: the block scales;
    ``o`` (``HAS_OFFSET``): the offsets."""
    nib = tl.arange(0, 8)
    # Rows: a is row g (0-7) and b row g + 8; lane (g, t) element e holds word 4 t + e.
    qa = ((tl.reshape(wa, [R, 8, 16])[:, :, :, None] >> (4 * nib)) & 0xF).to(tl.float32) - 8.0
    qb = ((tl.reshape(wb, [R, 8, 16])[:, :, :, None] >> (4 * nib)) & 0xF).to(tl.float32) - 8.0
    q = tl.join(tl.reshape(qa, [R, 8, 128]), tl.reshape(qb, [R, 8, 128]))  # [block, g, input, a/b]
    q = tl.reshape(tl.permute(q, [0, 3, 1, 2]), [R, 16, 128])  # [block, row, input]
    # Inputs: lane (g, t) element e of x_u holds pair 16 t + 4 u + e of token g.
    x01 = tl.join(tl.reshape(x0, [R, 8, 4, 4]), tl.reshape(x1, [R, 8, 4, 4]))
    x23 = tl.join(tl.reshape(x2, [R, 8, 4, 4]), tl.reshape(x3, [R, 8, 4, 4]))
    pairs = tl.join(x01, x23)  # [block, g, t, e, u % 2, u // 2]
    pairs = tl.reshape(tl.permute(pairs, [0, 1, 2, 5, 4, 3]), [R, 8, 64])  # pair 16 t + 4 u + e
    lo = (pairs << 16).to(tl.float32, bitcast=True)  # a bf16's bits are a float32's high half
    hi = (pairs & -65536).to(tl.float32, bitcast=True)
    x = tl.reshape(tl.join(lo, hi), [R, 8, 128])  # [block, token, input]
    d = tl.sum(q[:, :, None, :] * x[:, None, :, :], axis=3)  # [block, 16 rows, 8 tokens]
    # Back to the lanes: row g + 8 (e // 2), token 2 t + e % 2.
    d = tl.reshape(tl.permute(tl.reshape(d, [R, 2, 8, 4, 2]), [0, 2, 3, 1, 4]), [R, 128])
    if HAS_OFFSET:  # each token's sum x, in every row
        xs = tl.broadcast_to(tl.sum(x, axis=2)[:, None, :], [R, 16, 8])
        xs = tl.reshape(tl.permute(tl.reshape(xs, [R, 2, 8, 4, 2]), [0, 2, 3, 1, 4]), [R, 128])
        return d * s + (8.0 * s + o) * xs
    return d * s


@triton.jit
def _row(pid, g, half, N, GATED: tl.constexpr):
    """Weight row of lane group ``g`` in row half ``half`` (0: row a, 1: row b) of program ``pid``."""
    if GATED:
        return pid * 8 + g + half * (N // 2)
    return pid * 16 + g + 8 * half


@triton.jit
def _block_sums(x_ptr, q_ptr, kb, row_e, tok_e, M, stride_xm, stride_qn):
    """What the assembly computes, summed directly (the CPU interpreter): element ``[r, c]`` is
    ``sum_k (q[row_e, k] - 8) x[tok_e, k]`` over the 128 inputs of block ``kb[r]``; and
    ``sum_k x[tok_e, k]`` (for offsets)."""
    wd = tl.arange(0, 16)
    nib = tl.arange(0, 8)
    words = tl.load(q_ptr + (row_e.to(tl.int64) * stride_qn + 16 * kb)[:, :, None] + wd)
    q = ((words[:, :, :, None] >> (4 * nib)) & 0xF).to(tl.float32) - 8.0
    kk = 8 * wd[:, None] + nib[None, :]
    x_ok = (tok_e < M) & (kb >= 0)
    x = tl.load(x_ptr + (tok_e.to(tl.int64) * stride_xm + 128 * kb)[:, :, None, None] + kk,
                mask=x_ok[:, :, None, None], other=0.0).to(tl.float32)
    return tl.sum(tl.sum(q * x, axis=3), axis=2), tl.sum(tl.sum(x, axis=3), axis=2)


@triton.jit
def _mma_blocks(acc, wa, wb, x_lane, s_rows, o_rows, kb, ok, GROUP: tl.constexpr, R: tl.constexpr,
                EVEN: tl.constexpr, MODE: tl.constexpr, PTX: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """``acc`` plus blocks ``kb``'s scaled sums (``[R, 128]``) from their weights ``wa``, ``wb``:
    the inputs' loads, then the assembly (``MODE`` 1) or its model (2); ``ok``: the blocks that
    exist (the others were clamped to a real one and count zero)."""
    xb = x_lane + 64 * kb
    x0 = tl.load(xb, eviction_policy="evict_last")
    x1 = tl.load(xb + 4, eviction_policy="evict_last")
    x2 = tl.load(xb + 8, eviction_policy="evict_last")
    x3 = tl.load(xb + 12, eviction_policy="evict_last")
    g = (kb * 128) // GROUP
    if MODE == 1:
        if HAS_OFFSET:
            sums = _mma_block_asm_offsets(wa, wb, x0, x1, x2, x3, (s_rows + g).to(tl.int64),
                                          (o_rows + g).to(tl.int64), PTX)
        else:
            sums = _mma_block_asm(wa, wb, x0, x1, x2, x3, (s_rows + g).to(tl.int64), PTX)
    else:
        s = tl.load(s_rows + g).to(tl.float32)
        o = tl.load(o_rows + g).to(tl.float32) if HAS_OFFSET else s
        sums = _mma_block_model(wa, wb, x0, x1, x2, x3, s, o, R, HAS_OFFSET)
    if EVEN:
        return acc + sums
    return acc + sums * ok.to(tl.float32)


@triton.jit
def _gemv_int4_mma_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_qn,
                          stride_sn, stride_om, GROUP: tl.constexpr, BPI: tl.constexpr, WARPS: tl.constexpr,
                          GATED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                          MODE: tl.constexpr, PTX: tl.constexpr, PREFETCH: tl.constexpr,
                          PDL: tl.constexpr = False, HAS_OFFSET: tl.constexpr = False):
    # MODE 1: the assembly; 2: its Triton model (_mma_block_model, the CPU interpreter); 0: each
    # block's sums taken directly (_block_sums, no lane loads).
    # x_ptr: bf16 inputs as int32 pairs in modes 1 and 2 (stride_xm in pairs), else as they are.
    # q_ptr: [N, K / 8] int32 words (stride_qn in words). s_ptr: [N, K / GROUP] scales; o_ptr
    # (HAS_OFFSET: asymmetric weights) the offsets, with the scales' dtype and strides.
    # Tensors are [BPI * WARPS, 128]: row r is block it + r of the loop, column c is element
    # c % 4 of lane c // 4 (module docstring). Two dimensions, so that every Triton release lays
    # the loads out alike: 4 consecutive columns per thread, 32 threads along the columns,
    # warps along the rows (checked in Triton's IR by the tests).
    pid = tl.program_id(0)
    r = tl.arange(0, BPI * WARPS)[:, None]
    c = tl.arange(0, 128)[None, :]
    lane = c // 4
    e = c % 4
    g = lane // 4
    t = lane % 4
    row_e = _row(pid, g, e // 2, N, GATED)  # the rows and tokens of the sums' elements
    tok_e = 2 * t + e % 2
    wa_ptr = q_ptr + _row(pid, g, 0, N, GATED).to(tl.int64) * stride_qn + 4 * t + e
    wb_ptr = q_ptr + _row(pid, g, 1, N, GATED).to(tl.int64) * stride_qn + 4 * t + e
    # Tokens past M and blocks past K read clamped (valid) addresses instead of masked ones (no
    # zeroing or predicates in the loop): those tokens' sums are never stored, those blocks'
    # scales are 0.
    x_lane = x_ptr + tl.minimum(g, M - 1).to(tl.int64) * stride_xm + 16 * t + e  # word u's pairs at + 4 u
    s_rows = s_ptr + row_e.to(tl.int64) * stride_sn
    o_rows = o_ptr + row_e.to(tl.int64) * stride_sn
    nkb = K // 128
    step = BPI * WARPS
    acc = tl.zeros([BPI * WARPS, 128], dtype=tl.float32)
    start = 0
    if MODE != 0 and PREFETCH:
        # The first iteration, peeled: its weights are read before the wait for the kernel that
        # writes x (PDL). (Carrying the next iteration's weights through the loop instead cost
        # 30-54 register moves per iteration in the sm_90 code.)
        kb = tl.minimum(r, nkb - 1)
        wa = tl.load(wa_ptr + 16 * kb, eviction_policy="evict_first")
        wb = tl.load(wb_ptr + 16 * kb, eviction_policy="evict_first")
        pdl_begin(PDL)
        acc = _mma_blocks(acc, wa, wb, x_lane, s_rows, o_rows, kb, r < nkb, GROUP, BPI * WARPS, EVEN, MODE,
                          PTX, HAS_OFFSET)
        start = step
    else:
        pdl_begin(PDL)
    for it in range(start, nkb, step):
        kb = it + r  # [BPI * WARPS, 1]
        ok = kb < nkb
        if not EVEN:
            kb = tl.minimum(kb, nkb - 1)
        if MODE != 0:
            wa = tl.load(wa_ptr + 16 * kb, eviction_policy="evict_first")
            wb = tl.load(wb_ptr + 16 * kb, eviction_policy="evict_first")
            acc = _mma_blocks(acc, wa, wb, x_lane, s_rows, o_rows, kb, ok, GROUP, BPI * WARPS, EVEN, MODE,
                              PTX, HAS_OFFSET)
        else:
            sums, xsum = _block_sums(x_ptr, q_ptr, kb, row_e, tok_e, M, stride_xm, stride_qn)
            sc = tl.load(s_rows + (kb * 128) // GROUP).to(tl.float32)
            sums *= sc
            if HAS_OFFSET:
                sums += (8.0 * sc + tl.load(o_rows + (kb * 128) // GROUP).to(tl.float32)) * xsum
            if EVEN:
                acc += sums
            else:
                acc += sums * ok.to(tl.float32)
    y = tl.reshape(tl.sum(acc, axis=0), [32, 4])
    _mma_epilogue(y, bias_ptr, out_ptr, M, N, stride_om, GATED, HAS_BIAS)


@triton.jit
def _mma_epilogue(y, bias_ptr, out_ptr, M, N, stride_om, GATED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store the program's sums ``y`` ``[32 lanes, 4]`` (rows and tokens as in the module
    docstring): ``out[token, row] = y (+ bias[row])`` in ``out``'s dtype; gated, the gate and up
    sums of each output are rounded so, then ``silu(gate) * up`` (the activation kernel's own
    arithmetic: bit-for-bit the product followed by ``silu_and_mul``)."""
    pid = tl.program_id(0)
    lane = tl.arange(0, 32)[:, None]
    e = tl.arange(0, 4)[None, :]
    g = lane // 4
    rows = _row(pid, g, e // 2, N, GATED)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    if GATED:
        gate, up = tl.split(tl.permute(tl.reshape(y, [32, 2, 2]), [0, 2, 1]))  # [32, token parity]
        tok = 2 * (lane % 4) + tl.arange(0, 2)[None, :]
        o = pid * 8 + g
        act = silu_mul_tile(gate, up).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + tok.to(tl.int64) * stride_om + o, act, mask=tok < M)
    else:
        tok = 2 * (lane % 4) + e % 2
        tl.store(out_ptr + tok.to(tl.int64) * stride_om + rows, y, mask=tok < M)


def gemv_int4_mma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                  bias: torch.Tensor | None = None, *, gated: bool = False, tiles: MmaTiles | None = None,
                  mode: str | None = None, pdl: bool = False,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(qweight)^T`` for symmetric 4-bit weights (``qweight`` ``[N, K / 2]``
    bytes, low nibble first; ``scales`` ``[N, K / group_size]``; value ``(q - 8) * scale``), M at
    most 8: ``[M, N]`` in ``x.dtype`` (gated: ``[M, N / 2]``, ``silu_and_mul`` of it). ``mode``:
    ``"asm"`` the tensor-core assembly (the default on CUDA; needs :func:`mma_applies`),
    ``"model"`` the same lane loads with the assembly replaced by its Triton model (bf16 ``x``;
    the CPU interpreter's check of the assembly path), ``"sums"`` each block summed directly
    (the default elsewhere). float16 ``x`` (``"asm"``, ``"sums"``) subtracts with the FMA
    (``tiles.sub_mma`` is ignored: :func:`_mma_ptx`). ``offsets``: asymmetric weights, value
    ``q * scale + offset`` (``q`` 0..15; :func:`offsets_fit` the scales)."""
    m, k = x.shape
    n = qweight.shape[0]
    mode = mode or ("asm" if x.is_cuda else "sums")
    if mode not in _MODES:
        raise ValueError(f"gemv_int4_mma: mode {mode!r} is not one of {sorted(_MODES)}")
    if not _shape_ok(x, qweight, group_size) or qweight.shape[1] * 2 != k:
        raise ValueError(f"gemv_int4_mma: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"group_size {group_size}: needs M <= 8 and K, group_size multiples of 128, N of 16")
    tiles = tiles or mma_tiles(n, k)
    if mode == "asm" and not _aligned(x, qweight):
        raise ValueError("gemv_int4_mma: the assembly needs 16-byte aligned, contiguous rows (mma_applies)")
    if (mode == "model" and x.dtype != torch.bfloat16) or (mode == "asm" and x.dtype not in _ASM_DTYPES):
        raise ValueError(f"gemv_int4_mma: mode {mode!r} does not take {x.dtype} inputs")
    if offsets is not None and not offsets_fit(scales, offsets):
        raise ValueError("gemv_int4_mma: offsets need the scales' dtype, shape and strides")
    f16 = x.dtype == torch.float16
    if x.stride(1) != 1:
        x = x.contiguous()
    words = qweight.view(torch.int32)
    xv = x if mode == "sums" else x.view(torch.int32)
    out = torch.empty((m, n // 2 if gated else n), dtype=x.dtype, device=x.device)
    nkb = k // MMA_K
    _gemv_int4_mma_kernel[(n // 16,)](
        xv, words, scales, offsets if offsets is not None else scales, bias if bias is not None else scales,
        out, m, n, k,
        xv.stride(0), words.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BPI=tiles.blocks_per_iter, WARPS=tiles.warps, GATED=gated,
        HAS_BIAS=bias is not None, EVEN=nkb % (tiles.blocks_per_iter * tiles.warps) == 0, MODE=_MODES[mode],
        PTX=_BLOCK_PTX[(scales.dtype == torch.float32, tiles.sub_mma and not f16, f16, offsets is not None)],
        PREFETCH=tiles.prefetch, HAS_OFFSET=offsets is not None,
        num_warps=tiles.warps, **pdl_launch(pdl),
    )
    return out


_MODES = {"sums": 0, "asm": 1, "model": 2}
_ASM_DTYPES = (torch.bfloat16, torch.float16)  # inputs the assembly takes (_ACT)
