"""Inline PTX for the one-token 4-bit GEMV (:func:`kernels.triton_ops.gemv.gemv_wna16`).

Each decode is a PTX generator (``*_ptx``, a string, checked instruction by instruction on the
CPU by ``tests/kernels/ptx_model.py``) and a ``@triton.jit`` wrapper (``*_asm``) that hands it to
``tl.inline_asm_elementwise``. CUDA only: the CPU interpreter runs no PTX, and the kernel takes its
Triton forms there.

- :func:`nibbles_asm`: a word's eight nibbles as float32 ``q - SUB`` (the float32 decode);
- :func:`pairs_asm` with :func:`load_pairs_asm`: the packed 16-bit decode (bf16 / float16 pairs);
- :func:`load_limbs_asm` with :func:`dp4a_asm`: the integer decode (16-bit fixed-point inputs,
  ``dp4a`` on the nibbles in place);
- :func:`load_inputs_asm`, :func:`load_groups_asm`: inputs and scales loaded in the word tile's
  layout, so no shared-memory crossing sits between them and the products.

Module globals read by a kernel are ``tl.constexpr`` (Triton 3.6).
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl


def nibbles_ptx(sub: float) -> str:
    """PTX for :func:`nibbles_asm`: the eight nibbles of word ``$8`` as float32 ``q - sub`` in
    ``$0 .. $7``, each by one ``lop3`` (AND-OR) and one ``sub.f32``, the arithmetic of
    :func:`~kernels.triton_ops.gemv._nibble_as_float` (the same bits)."""
    fields = [("$8", 0), ("$8", 4), ("$8", 8), ("$8", 12), ("$8", 16), ("h", 0), ("h", 4), ("h", 8)]
    lines = ["{", ".reg .b32 h;", "shr.u32 h, $8, 20;"]
    for out, (src, shift) in enumerate(fields):
        magic = struct.unpack(">I", struct.pack(">f", 2.0 ** (23 - shift) + sub))[0]
        lines.append(f"lop3.b32 ${out}, {src}, {0xF << shift:#x}, {(150 - shift) << 23:#x}, 0xEA;")
        lines.append(f"sub.f32 ${out}, ${out}, 0f{magic:08X};")
    lines.append("}")
    return "\n".join(lines)


_NIBBLES_PTX_SYMMETRIC = tl.constexpr(nibbles_ptx(8.0))
_NIBBLES_PTX_OFFSETS = tl.constexpr(nibbles_ptx(0.0))


@triton.jit
def nibbles_asm(w, SUB: tl.constexpr):
    """The eight nibbles of each int32 word of ``w`` as float32 ``q - SUB`` (SUB 8 or 0), eight
    tensors, in inline PTX: Triton 3.6 emits the AND and the OR of
    :func:`~kernels.triton_ops.gemv._nibble_as_float` as two LOP3s and rematerialises their
    constants; here one LOP3 each, the constants hoisted
    (the loop of the llama3-8b tiling: 561 instructions per 128 weights per thread, against
    719; ``bench/sass_report.py``). CUDA only: the CPU interpreter runs no PTX."""
    tl.static_assert((SUB == 8.0) or (SUB == 0.0), "the PTX nibble decode takes SUB 8 or 0")
    ptx: tl.constexpr = _NIBBLES_PTX_SYMMETRIC if SUB == 8.0 else _NIBBLES_PTX_OFFSETS
    return tl.inline_asm_elementwise(ptx, "=f,=f,=f,=f,=f,=f,=f,=f,r", [w], dtype=(tl.float32,) * 8,
                                     is_pure=True, pack=1)


def pairs_ptx(act: str = "bf16") -> str:
    """PTX for :func:`pairs_asm`: word ``$1``'s eight symmetric nibbles times the inputs paired
    in ``$2 .. $5``, summed, in ``$0``. bf16: each AND-OR (LOP3) makes two nibbles bf16 ``128 + q``
    side by side (nibbles ``i`` and ``i + 4``: bits ``4i`` and ``4i + 16``, so three shifts for
    the eight), one packed FMA ``* 1 - 136`` makes them ``q - 8`` (exact), and packed FMAs
    multiply them by their inputs and sum the four pairs per half in bf16; the two halves are
    added in float32. 18 instructions per word against 25 for :func:`nibbles_asm` and its eight
    float32 FMAs; the products and the four-term sums round to bf16 (8 bits).
    fp16 (``act``): float16's ten mantissa bits take a nibble at bits 0-3 (``1024 + q``) or 4-7
    (``1024 + 16 q``) of each half, so one shift serves the eight, and the packed FMAs
    ``* 1/16 - 64.5`` and ``* 1/256 - 4.5`` make both ``(q - 8) / 16`` (exact): the products
    and four-term sums (rounded to float16, 11 bits) stay below ``2 |x|``, so inputs up to half
    of float16's range cannot overflow them. The sum is a sixteenth of the word's: the caller
    multiplies the group's scale by 16."""
    if act == "fp16":
        lines = ["{", ".reg .b32 t, a, b, c, d, k0, k1, b0, b1;", ".reg .b16 l, h;", ".reg .f32 fl, fh;",
                 "mov.b32 k0, 0x2C002C00;", "mov.b32 b0, 0xD408D408;",  # 1/16, -64.5
                 "mov.b32 k1, 0x1C001C00;", "mov.b32 b1, 0xC480C480;",  # 1/256, -4.5
                 "lop3.b32 a, $1, 0x000F000F, 0x64006400, 0xEA;",
                 "lop3.b32 b, $1, 0x00F000F0, 0x64006400, 0xEA;",
                 "shr.u32 t, $1, 8;",
                 "lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;",
                 "lop3.b32 d, t, 0x00F000F0, 0x64006400, 0xEA;",
                 "fma.rn.f16x2 a, a, k0, b0;", "fma.rn.f16x2 b, b, k1, b1;",
                 "fma.rn.f16x2 c, c, k0, b0;", "fma.rn.f16x2 d, d, k1, b1;",
                 "mov.b32 t, 0x80008000;", "fma.rn.f16x2 a, a, $2, t;", "fma.rn.f16x2 a, b, $3, a;",
                 "fma.rn.f16x2 a, c, $4, a;", "fma.rn.f16x2 a, d, $5, a;",
                 "mov.b32 {l, h}, a;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;", "add.f32 $0, fl, fh;", "}"]
        return "\n".join(lines)
    lines = ["{", ".reg .b32 t, a, b, c, d, one, bias, lo, hi;",
             "mov.b32 one, 0x3F803F80;", "mov.b32 bias, 0xC308C308;",
             "lop3.b32 a, $1, 0x000F000F, 0x43004300, 0xEA;"]
    for reg, shift in (("b", 4), ("c", 8), ("d", 12)):
        lines.append(f"shr.u32 t, $1, {shift};")
        lines.append(f"lop3.b32 {reg}, t, 0x000F000F, 0x43004300, 0xEA;")
    for reg in "abcd":
        lines.append(f"fma.rn.bf16x2 {reg}, {reg}, one, bias;")
    lines += ["mov.b32 t, 0x80008000;", "fma.rn.bf16x2 a, a, $2, t;", "fma.rn.bf16x2 a, b, $3, a;",
              "fma.rn.bf16x2 a, c, $4, a;", "fma.rn.bf16x2 a, d, $5, a;",
              "shl.b32 lo, a, 16;", "and.b32 hi, a, 0xFFFF0000;", "add.f32 $0, lo, hi;", "}"]
    return "\n".join(lines)


_PAIRS_PTX = tl.constexpr(pairs_ptx())
_PAIRS_PTX_F16 = tl.constexpr(pairs_ptx("fp16"))


@triton.jit
def pairs_asm(w, p0, p1, p2, p3, F16: tl.constexpr):
    """``sum_i (q_i - 8) x_i`` over each int32 word of symmetric nibbles ``w`` (``F16``: a
    sixteenth of it), with the inputs as 16-bit pairs ``p_i = (x_i, x_{i+4})``
    (:func:`~kernels.triton_ops.gemv._load_pair`), in inline PTX (:func:`pairs_ptx`). CUDA only,
    bf16 (``F16``: float16) inputs, no offsets."""
    ptx: tl.constexpr = _PAIRS_PTX_F16 if F16 else _PAIRS_PTX
    return tl.inline_asm_elementwise(ptx, "=f,r,r,r,r,r", [w, p0, p1, p2, p3], dtype=tl.float32,
                                     is_pure=True, pack=1)


def pair_loads_ptx() -> str:
    """PTX for :func:`load_pairs_asm`: the eight bf16 inputs at address ``$4`` (16-byte aligned)
    in one 16-byte load, regrouped by four byte permutes into the pairs :func:`pairs_asm` takes,
    ``(x_r, x_{r+4})`` in ``$r`` (the first in the low half)."""
    lines = ["{", ".reg .b32 a, b, c, d;", "// $5: the PDL wait's token (an ordering operand only)",
             "ld.global.v4.b32 {a, b, c, d}, [$4];"]
    for out, (lo, hi, sel) in enumerate((("a", "c", "0x5410"), ("a", "c", "0x7632"),
                                         ("b", "d", "0x5410"), ("b", "d", "0x7632"))):
        lines.append(f"prmt.b32 ${out}, {lo}, {hi}, {sel};")
    lines.append("}")
    return "\n".join(lines)


_PAIR_LOADS_PTX = tl.constexpr(pair_loads_ptx())


@triton.jit
def load_pairs_asm(xw, token):
    """The four input pairs of each word (as :func:`~kernels.triton_ops.gemv._load_pair` makes
    them) from its inputs' address ``xw``, in inline PTX: the loads then take the layout of the
    word tile's columns. A ``tl.load`` here gets a layout of its own (strided bf16 loads spread
    over every thread), and each pair then crossed to the word layout through shared memory
    behind two barriers (eight barriers per tile). The inputs are what the kernel before wrote: ``token``
    (:func:`~kernels.triton_ops.pdl.pdl_begin`'s) orders the loads after the PDL wait. CUDA only,
    whole tiles (no mask), ``xw`` 16-byte aligned."""
    return tl.inline_asm_elementwise(_PAIR_LOADS_PTX, "=r,=r,=r,=r,l,r", [xw, token], dtype=(tl.int32,) * 4,
                                     is_pure=True, pack=1)


# The integer decode (``dp4a``): 16-bit fixed-point inputs and ``dp4a`` on nibbles in place.
_MAGIC = 0x4B400000  # 1.5 * 2^23 as float32: y + 1.5 * 2^23 holds round(y) in its low bits
_NIBBLE_LUT = (0xF0 ^ 0xCC) & 0xAA  # lop3 (a ^ b) & c


# Per input dtype, for limbs_ptx: the packed max of magnitudes, the exponent field (first bit,
# width), its floor, the float32 bits of 2^(15 - E) as (constant - field) << 23 and of the unit
# 2^(E - 19) as (field + constant) << 23, and the field of a NaN or infinity.
_LIMB_TYPES = {
    # bf16: E = e - 126 (2^E above |x|), 2^(141 - e), 2^(e - 145); fields below 19 count as 19
    "bf16": ("max.NaN.xorsign.abs.bf16x2", 7, 8, 19, 268, -18, 255),
    # float16: E = e - 14, 2^(29 - e), 2^(e - 33); subnormals (field 0) count as field 1
    "fp16": ("max.NaN.xorsign.abs.f16x2", 10, 5, 1, 156, 94, 31),
}


def limbs_ptx(words: int = 1, act: str = "bf16") -> str:
    """PTX for :func:`load_limbs_asm`: ``words`` (1 or 2) consecutive words' 16-bit inputs
    (``act``: bf16 or float16), eight per word, as 16-bit fixed point ``v_i = round(x_i 2^(15 -
    E))`` with ``2^E`` above the largest ``|x_i|`` of the words (``E`` from its exponent field
    ``e``: ``e - 126`` in bf16, ``e - 14`` in float16, with a floor that only tiny inputs reach),
    split into bytes ``v = 256 hi + lo`` (``lo`` unsigned, ``hi`` signed) and packed for
    :func:`dp4a_ptx`. Operands (result-major, as ``inline_asm_elementwise`` numbers them with
    ``pack=words``), per word ``u``: the ``lo`` of inputs 0, 2, 4, 6 (byte ``j`` input ``2 j``),
    of inputs 1, 3, 5, 7, the ``hi`` of each, the float32 unit of the dp4a sums ``2^(E - 19)``
    (NaN where an input is not finite); then each word's input address (16-byte aligned) and
    the PDL wait's token. Each ``v`` is one FMA on the input as float32: ``x 2^(15 - E) + 1.5
    2^23`` holds ``round(x 2^(15 - E))`` in its low 16 bits (``|v| <= 32,752``)."""
    vmax, first, width, floor, g_const, unit_const, special = _LIMB_TYPES[act]

    def out(result: int, u: int) -> str:
        return f"${result * words + u}"
    addr = [f"${5 * words + u}" for u in range(words)]
    regs = [[f"{c}{u}" for c in "abcd"] for u in range(words)]
    lines = ["{", ".reg .b32 " + ", ".join(r for word in regs for r in word)
             + ", m, t, e, g, y0, y1, y2, y3, y4, y5, y6, y7, s0, s1;", ".reg .pred p;",
             "// the last operands: the PDL wait's token"]
    if act == "fp16":
        lines.insert(2, ".reg .b16 l, h;")
    lines += [f"ld.global.v4.b32 {{{', '.join(regs[u])}}}, [{addr[u]}];" for u in range(words)]
    # |x| by halves (NaN kept), then the larger of the two halves' fields
    flat = [r for word in regs for r in word]
    lines.append(f"{vmax} m, {flat[0]}, {flat[1]};")
    for r in flat[2:]:
        lines.append(f"{vmax} m, m, {r};")
    unit = (f"sub.u32 t, e, {-unit_const << 23};" if unit_const < 0 else f"add.u32 t, e, {unit_const << 23};")
    lines += ["and.b32 m, m, 0x7FFF7FFF;", "shr.u32 t, m, 16;", "and.b32 m, m, 0xFFFF;", "max.u32 m, m, t;",
              f"bfe.u32 e, m, {first}, {width};", f"max.u32 e, e, {floor};",
              "shl.b32 e, e, 23;", f"sub.u32 g, {g_const << 23}, e;",  # 2^(15 - E)
              unit,  # 2^(E - 19)
              f"setp.ge.u32 p, e, {special << 23};"]
    lines += [f"selp.b32 {out(4, u)}, 0x7FC00000, t, p;" for u in range(words)]
    for u in range(words):
        for i, reg in enumerate(regs[u]):
            if act == "fp16":
                lines += [f"mov.b32 {{l, h}}, {reg};", f"cvt.f32.f16 y{2 * i}, l;",
                          f"cvt.f32.f16 y{2 * i + 1}, h;"]
            else:
                lines += [f"shl.b32 y{2 * i}, {reg}, 16;", f"and.b32 y{2 * i + 1}, {reg}, 0xFFFF0000;"]
            lines += [f"fma.rn.f32 y{2 * i}, y{2 * i}, g, 0f{_MAGIC:08X};",
                      f"fma.rn.f32 y{2 * i + 1}, y{2 * i + 1}, g, 0f{_MAGIC:08X};"]
        for first_input, lo, hi in ((0, 0, 2), (1, 1, 3)):
            ys = [f"y{first_input + 2 * j}" for j in range(4)]
            lines += [f"prmt.b32 s0, {ys[0]}, {ys[1]}, 0x5140;", f"prmt.b32 s1, {ys[2]}, {ys[3]}, 0x5140;",
                      f"prmt.b32 {out(lo, u)}, s0, s1, 0x5410;", f"prmt.b32 {out(hi, u)}, s0, s1, 0x7632;"]
    lines.append("}")
    return "\n".join(lines)


def dp4a_ptx(words: int = 1) -> str:
    """PTX for :func:`dp4a_asm`: ``words`` (1 or 2) consecutive words of symmetric nibbles times
    their inputs from :func:`limbs_ptx` (one unit), summed, in the first word's result (the
    second's is 0). Operands (result-major, ``pack=words``): the results, then per operand the
    words' values: the words, the four packed inputs, the unit. One LOP3 puts nibbles ``1, 3,
    5, 7`` in the high halves of the four bytes with their top bit flipped, so each byte read as
    int8 is ``16 (q - 8)``; a shift and a LOP3 do the same for ``0, 2, 4, 6``; ``dp4a`` sums
    ``16 (q - 8)`` times the ``lo`` and the ``hi`` bytes in int32 (exact), started at ``1.5
    2^23`` so that each sum read as float32 is ``1.5 2^23`` more than it (both stay below
    ``2^22`` in magnitude), and ``(256 hi + lo) * unit`` is the words' sum: 11 instructions for
    one word, 18 for two, against 18 per word for :func:`pairs_ptx`."""
    lut = f"0x{_NIBBLE_LUT:02X}"

    def arg(operand: int, u: int) -> str:  # operand 0 the words, 1-4 lo_e, lo_o, hi_e, hi_o, 5 the unit
        return f"${words + operand * words + u}"
    lines = ["{", ".reg .b32 t, we, wo, sl, sh, mg;", ".reg .f32 fl, fh;", f"mov.b32 mg, {_MAGIC};"]
    for u in range(words):
        acc_l, acc_h = ("mg", "mg") if u == 0 else ("sl", "sh")
        lines += [f"shl.b32 t, {arg(0, u)}, 4;",
                  f"lop3.b32 we, t, 0x88888888, 0xF0F0F0F0, {lut};",
                  f"lop3.b32 wo, {arg(0, u)}, 0x88888888, 0xF0F0F0F0, {lut};",
                  f"dp4a.s32.u32 sl, we, {arg(1, u)}, {acc_l};", f"dp4a.s32.u32 sl, wo, {arg(2, u)}, sl;",
                  f"dp4a.s32.s32 sh, we, {arg(3, u)}, {acc_h};", f"dp4a.s32.s32 sh, wo, {arg(4, u)}, sh;"]
    lines += [f"sub.f32 fl, sl, 0f{_MAGIC:08X};", f"sub.f32 fh, sh, 0f{_MAGIC:08X};",
              "fma.rn.f32 fl, fh, 0f43800000, fl;",  # 256 hi + lo
              f"mul.f32 $0, fl, {arg(5, 0)};"]
    lines += [f"mov.b32 ${u}, 0;" for u in range(1, words)]
    lines.append("}")
    return "\n".join(lines)


# The kernel runs the two-word programs (pack=2: each thread's two consecutive words of a row,
# _dp4a_words); the one-word forms of the generators are exercised by the PTX tests only.
_LIMBS_PTX_2 = tl.constexpr(limbs_ptx(2))
_LIMBS_PTX_2_F16 = tl.constexpr(limbs_ptx(2, "fp16"))
_DP4A_PTX_2 = tl.constexpr(dp4a_ptx(2))


@triton.jit
def load_limbs_asm(xw, token, F16: tl.constexpr):
    """The eight 16-bit inputs of each word (address ``xw``; bf16, ``F16`` float16) as the packed
    fixed-point bytes and unit of :func:`limbs_ptx`, one unit per two consecutive words of a
    thread, in the word tile's layout (as :func:`load_pairs_asm`). CUDA only."""
    ptx: tl.constexpr = _LIMBS_PTX_2_F16 if F16 else _LIMBS_PTX_2
    return tl.inline_asm_elementwise(ptx, "=r,=r,=r,=r,=r,=r,=r,=r,=f,=f,l,l,r,r", [xw, token],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.float32),
                                     is_pure=True, pack=2)


@triton.jit
def dp4a_asm(w, l0, l1, h0, h1, unit):
    """``sum_i (q_i - 8) x_i`` over each two consecutive int32 words of symmetric nibbles ``w`` of
    a thread by :func:`dp4a_ptx` from the inputs of :func:`load_limbs_asm`: the two words' sum
    in the first, 0 in the second. CUDA only."""
    return tl.inline_asm_elementwise(_DP4A_PTX_2, "=f,=f" + ",r" * 10 + ",f,f", [w, l0, l1, h0, h1, unit],
                                     dtype=tl.float32, is_pure=True, pack=2)


def input_loads_ptx(act: str) -> str:
    """PTX for :func:`load_inputs_asm`: the eight 16-bit inputs at address ``$8`` (16-byte
    aligned) in one 16-byte load, as float32 ``$0 .. $7`` (bf16: a shift or a mask each; float16:
    a conversion each). ``$9``: the PDL wait's token (an ordering operand only)."""
    lines = ["{", ".reg .b32 a, b, c, d;", ".reg .b16 l, h;", "// $9: the PDL wait's token",
             "ld.global.v4.b32 {a, b, c, d}, [$8];"]
    for i, reg in enumerate("abcd"):
        if act == "fp16":
            lines += [f"mov.b32 {{l, h}}, {reg};", f"cvt.f32.f16 ${2 * i}, l;",
                      f"cvt.f32.f16 ${2 * i + 1}, h;"]
        else:
            lines += [f"shl.b32 ${2 * i}, {reg}, 16;", f"and.b32 ${2 * i + 1}, {reg}, 0xFFFF0000;"]
    lines.append("}")
    return "\n".join(lines)


_INPUT_LOADS_PTX_BF16 = tl.constexpr(input_loads_ptx("bf16"))
_INPUT_LOADS_PTX_F16 = tl.constexpr(input_loads_ptx("fp16"))


@triton.jit
def load_inputs_asm(xw, token, F16: tl.constexpr):
    """The eight inputs of each word from its inputs' address ``xw`` as float32, in inline PTX in
    the word tile's layout (as :func:`load_pairs_asm`, whose reasons and ``token`` apply). CUDA
    only, bf16 (``F16``: float16) inputs, whole tiles, ``xw`` 16-byte aligned."""
    ptx: tl.constexpr = _INPUT_LOADS_PTX_F16 if F16 else _INPUT_LOADS_PTX_BF16
    x0, x1, x2, x3, x4, x5, x6, x7 = tl.inline_asm_elementwise(
        ptx, "=r,=r,=r,=r,=r,=r,=r,=r,l,r", [xw, token], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    return (x0.to(tl.float32, bitcast=True), x1.to(tl.float32, bitcast=True), x2.to(tl.float32, bitcast=True),
            x3.to(tl.float32, bitcast=True), x4.to(tl.float32, bitcast=True), x5.to(tl.float32, bitcast=True),
            x6.to(tl.float32, bitcast=True), x7.to(tl.float32, bitcast=True))


# Scale loads in inline PTX, per dtype, as float32 (see load_groups_asm).
_GROUP_LOAD_BF16 = tl.constexpr("{\n.reg .b32 r;\nld.global.u16 r, [$1];\nshl.b32 $0, r, 16;\n}")
_GROUP_LOAD_F16 = tl.constexpr("{\n.reg .b16 h;\nld.global.b16 h, [$1];\ncvt.f32.f16 $0, h;\n}")
_GROUP_LOAD_F32 = tl.constexpr("ld.global.b32 $0, [$1];")


@triton.jit
def load_groups_asm(ptrs):
    """The scales at ``ptrs`` (bf16, float16 or float32 weights) as float32, in inline PTX, so that
    they take the layout of the sums they multiply (a ``tl.load`` gets one of its own and crosses
    to it through shared memory behind barriers). Pure: weights only. CUDA only, no mask."""
    ty: tl.constexpr = ptrs.dtype.element_ty
    if ty == tl.bfloat16:
        bits = tl.inline_asm_elementwise(_GROUP_LOAD_BF16, "=r,l", [ptrs], dtype=tl.int32, is_pure=True,
                                         pack=1)
    elif ty == tl.float16:
        bits = tl.inline_asm_elementwise(_GROUP_LOAD_F16, "=r,l", [ptrs], dtype=tl.int32, is_pure=True,
                                         pack=1)
    else:
        bits = tl.inline_asm_elementwise(_GROUP_LOAD_F32, "=r,l", [ptrs], dtype=tl.int32, is_pure=True,
                                         pack=1)
    return bits.to(tl.float32, bitcast=True)
