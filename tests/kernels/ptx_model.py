"""A small interpreter of the PTX our kernels inline (``tl.inline_asm_elementwise``), for tests
without a GPU: the 32 lanes of a warp run a program in lockstep on numpy uint32 registers, each
instruction as the PTX ISA defines it (``mma.sync`` m16n8k16 fragments included). It models only
the instructions our programs use and fails on any other, so a test of a program also checks
that nothing in it went unmodelled.
"""

from __future__ import annotations

import re

import numpy as np

_LANES = 32


def _bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _f16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint16).view(np.float16).astype(np.float64)


_TO_F64 = {"bf16": _bf16_bits_to_f64, "f16": _f16_bits_to_f64}


def _mma_m16n8k16(a: list[np.ndarray], b: list[np.ndarray], c: list[np.ndarray],
                  typ: str = "bf16") -> list[np.ndarray]:
    """``D = A B + C`` of one warp (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
    type"), A and B of ``typ`` (bf16 or f16): lane ``l``, ``group = l // 4``, ``tig = l % 4``.
    A (16 x 16): register ``i`` holds
    two elements of row ``group + 8 (i % 2)``, columns ``2 tig + 8 (i // 2) + {0, 1}`` (low half
    first). B (16 x 8): register ``i`` holds rows ``2 tig + 8 i + {0, 1}`` of column ``group``.
    C/D (16 x 8 float32): element ``i`` is row ``group + 8 (i // 2)``, column ``2 tig + i % 2``."""
    am = np.zeros((16, 16))
    bm = np.zeros((16, 8))
    cm = np.zeros((16, 8))
    for lane in range(_LANES):
        grp, tig = lane // 4, lane % 4
        for i in range(4):
            lo, hi = a[i][lane] & 0xFFFF, a[i][lane] >> 16
            row, col = grp + 8 * (i % 2), 2 * tig + 8 * (i // 2)
            am[row, col], am[row, col + 1] = _TO_F64[typ](np.array([lo, hi]))
        for i in range(2):
            lo, hi = b[i][lane] & 0xFFFF, b[i][lane] >> 16
            row = 2 * tig + 8 * i
            bm[row, grp], bm[row + 1, grp] = _TO_F64[typ](np.array([lo, hi]))
        for i in range(4):
            cm[grp + 8 * (i // 2), 2 * tig + i % 2] = c[i][lane].view(np.float32)
    dm = (am @ bm + cm).astype(np.float32)
    out = [np.zeros(_LANES, dtype=np.uint32) for _ in range(4)]
    for lane in range(_LANES):
        grp, tig = lane // 4, lane % 4
        for i in range(4):
            out[i][lane] = dm[grp + 8 * (i // 2), 2 * tig + i % 2].view(np.uint32)
    return out


def _f64_to_bf16_bits(v: np.ndarray) -> np.ndarray:
    """Round to nearest even (through float32: exact for the small integers the program makes)."""
    bits = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) & 0xFFFF


def _f64_to_f16_bits(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint16).astype(np.uint32)


def _fma_x2(a: np.ndarray, b: np.ndarray, c: np.ndarray, typ: str = "bf16") -> np.ndarray:
    """``fma.rn.{typ}x2``: both 16-bit halves, rounded to nearest (exact for the program's
    small integers)."""
    to_bits = _f64_to_bf16_bits if typ == "bf16" else _f64_to_f16_bits
    out = np.zeros_like(a)
    for half in (0, 16):
        av, bv, cv = (_TO_F64[typ]((r >> half) & 0xFFFF) for r in (a, b, c))
        out |= to_bits(av * bv + cv) << half
    return out


def _lop3(a: np.ndarray, b: int, c: int, lut: int) -> np.ndarray:
    out = np.zeros_like(a)
    for bit in range(32):
        ia, ib, ic = (a >> bit) & 1, (b >> bit) & 1, (c >> bit) & 1
        out |= ((lut >> (ia * 4 + ib * 2 + ic)) & 1).astype(np.uint32) << bit
    return out


def _prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    src = (b.astype(np.uint64) << 32) | a.astype(np.uint64)
    out = np.zeros_like(a)
    for byte in range(4):
        idx = (sel >> (4 * byte)) & 0x7
        out |= (((src >> np.uint64(8 * idx)) & np.uint64(0xFF)).astype(np.uint32)) << (8 * byte)
    return out


def _max_xorsign_abs_x2(a: np.ndarray, b: np.ndarray, typ: str) -> np.ndarray:
    """``max.NaN.xorsign.abs.{bf16x2,f16x2}``: per half the larger magnitude (a NaN if either is
    one), its sign the XOR of the two signs."""
    inf, nan_bits = (0x7F80, 0x7FC0) if typ == "bf16" else (0x7C00, 0x7E00)
    out = np.zeros_like(a)
    for half in (0, 16):
        ha, hb = (a >> half) & 0xFFFF, (b >> half) & 0xFFFF
        ma, mb = ha & 0x7FFF, hb & 0x7FFF
        nan = (ma > inf) | (mb > inf)
        mag = np.where(nan, nan_bits, np.maximum(ma, mb))  # magnitudes order as integers
        sign = (ha ^ hb) & 0x8000
        out |= ((mag | sign) & 0xFFFF).astype(np.uint32) << half
    return out


def _dp4a(a: np.ndarray, b: np.ndarray, c: np.ndarray, a_signed: bool, b_signed: bool) -> np.ndarray:
    """``dp4a``: the four byte products of ``a`` and ``b`` (each signed or not) added to ``c``, int32."""
    total = c.view(np.int32).astype(np.int64)
    for byte in range(4):
        av = ((a >> (8 * byte)) & 0xFF).astype(np.int64)
        bv = ((b >> (8 * byte)) & 0xFF).astype(np.int64)
        if a_signed:
            av = np.where(av > 127, av - 256, av)
        if b_signed:
            bv = np.where(bv > 127, bv - 256, bv)
        total += av * bv
    return (total & 0xFFFFFFFF).astype(np.uint32)


MODELLED = frozenset({
    "max.NaN.xorsign.abs.bf16x2", "max.NaN.xorsign.abs.f16x2", "max.u32", "bfe.u32", "sub.u32", "add.u32",
    "setp.ge.u32", "selp.b32",
    "dp4a.s32.u32", "dp4a.s32.s32", "sub.f32",
    "mov.f32", "mov.b32", "mov.b16", "prmt.b32", "lop3.b32", "fma.rn.bf16x2", "fma.rn.f16x2", "shr.u32",
    "shl.b32", "and.b32", "add.f32", "ld.global.nc.b16", "ld.global.b16", "ld.global.u16",
    "ld.global.nc.f32", "ld.global.b32", "ld.global.v4.b32", "cvt.f32.f16", "mul.f32", "fma.rn.f32",
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
})


def opcodes(ptx: str) -> set[str]:
    """The opcodes of a program (braces and register declarations left out)."""
    ops = set()
    for line in ptx.splitlines():
        line = line.strip()
        if line and line not in ("{", "}") and not line.startswith((".reg", "//")):
            ops.add(line.split(" ", 1)[0])
    return ops


def run_ptx(ptx: str, operands: dict[int, np.ndarray], memory: bytes = b"") -> dict[str, np.ndarray]:
    """Execute ``ptx`` for the 32 lanes of a warp in lockstep. ``operands``: ``$i`` per lane (uint32
    registers; addresses are byte offsets into ``memory``). Returns every register (uint32 per lane)."""
    regs: dict[str, np.ndarray] = {f"${i}": v.astype(np.uint32) for i, v in operands.items()}

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if tok.startswith("0f"):
            return np.full(_LANES, int(tok[2:], 16), dtype=np.uint32)
        return np.full(_LANES, int(tok, 0), dtype=np.uint32)

    def load(addr: np.ndarray, nbytes: int) -> np.ndarray:
        values = [int.from_bytes(memory[int(p): int(p) + nbytes], "little") for p in addr]
        return np.array(values, dtype=np.uint32)

    body = [line.strip().rstrip(";") for line in ptx.splitlines()]
    for line in body:
        if line in ("{", "}") or line.startswith((".reg", "//")):
            continue
        op, _, rest = line.partition(" ")
        if op.startswith("mma.sync"):
            groups = [g.split(",") for g in re.findall(r"\{([^}]*)\}", rest)]
            d, a, b, c = ([g.strip() for g in grp] for grp in groups)
            typ = op.split(".")[-3]  # mma.sync.aligned.m16n8k16.row.col.f32.<typ>.<typ>.f32
            for name, value in zip(d, _mma_m16n8k16([val(x) for x in a], [val(x) for x in b],
                                                      [val(x) for x in c], typ), strict=True):
                regs[name] = value
            continue
        args = [x.strip() for x in re.split(r",(?![^{]*\})", rest)]
        dst = args[0]
        if op == "mov.b32" and dst.startswith("{"):  # unpack into two 16-bit halves, low first
            lo_name, hi_name = (x.strip() for x in dst.strip("{}").split(","))
            regs[lo_name], regs[hi_name] = val(args[1]) & 0xFFFF, val(args[1]) >> 16
        elif op in ("mov.f32", "mov.b32", "mov.b16"):
            if args[1].startswith("{"):  # pack two 16-bit halves, low first
                lo, hi = (val(x) for x in args[1].strip("{}").split(","))
                regs[dst] = (lo & 0xFFFF) | ((hi & 0xFFFF) << 16)
            else:
                regs[dst] = val(args[1])
        elif op == "prmt.b32":
            regs[dst] = _prmt(val(args[1]), val(args[2]), int(args[3], 0))
        elif op == "lop3.b32":
            regs[dst] = _lop3(val(args[1]), int(args[2], 0), int(args[3], 0), int(args[4], 0))
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            regs[dst] = _fma_x2(val(args[1]), val(args[2]), val(args[3]), op.split(".")[2][:-2])
        elif op == "shr.u32":
            regs[dst] = val(args[1]) >> int(args[2], 0)
        elif op == "shl.b32":
            regs[dst] = val(args[1]) << np.uint32(int(args[2], 0))
        elif op == "and.b32":
            regs[dst] = val(args[1]) & val(args[2])
        elif op == "add.f32":
            total = val(args[1]).view(np.float32) + val(args[2]).view(np.float32)
            regs[dst] = total.astype(np.float32).view(np.uint32)
        elif op in ("ld.global.nc.b16", "ld.global.b16", "ld.global.u16"):
            regs[dst] = load(val(args[1].strip("[]")), 2)
        elif op in ("ld.global.nc.f32", "ld.global.b32"):
            regs[dst] = load(val(args[1].strip("[]")), 4)
        elif op == "ld.global.v4.b32":  # four consecutive words into a brace group
            addr = val(args[1].strip("[]"))
            for i, name in enumerate(x.strip() for x in dst.strip("{}").split(",")):
                regs[name] = load(addr + np.uint32(4 * i), 4)
        elif op == "cvt.f32.f16":
            half = (val(args[1]) & 0xFFFF).astype(np.uint16).view(np.float16)
            regs[dst] = half.astype(np.float32).view(np.uint32)
        elif op == "fma.rn.f32":
            a, b, c = (val(x).view(np.float32).astype(np.float64) for x in args[1:4])
            regs[dst] = (a * b + c).astype(np.float32).view(np.uint32)
        elif op in ("max.NaN.xorsign.abs.bf16x2", "max.NaN.xorsign.abs.f16x2"):
            regs[dst] = _max_xorsign_abs_x2(val(args[1]), val(args[2]), op.split(".")[-1][:-2])
        elif op == "max.u32":
            regs[dst] = np.maximum(val(args[1]), val(args[2]))
        elif op == "bfe.u32":
            regs[dst] = (val(args[1]) >> int(args[2], 0)) & np.uint32((1 << int(args[3], 0)) - 1)
        elif op == "sub.u32":
            regs[dst] = ((val(args[1]).astype(np.int64) - val(args[2])) & 0xFFFFFFFF).astype(np.uint32)
        elif op == "add.u32":
            regs[dst] = ((val(args[1]).astype(np.int64) + val(args[2])) & 0xFFFFFFFF).astype(np.uint32)
        elif op == "setp.ge.u32":
            regs[dst] = (val(args[1]) >= val(args[2])).astype(np.uint32)
        elif op == "selp.b32":
            regs[dst] = np.where(val(args[3]) != 0, val(args[1]), val(args[2])).astype(np.uint32)
        elif op in ("dp4a.s32.u32", "dp4a.s32.s32"):
            regs[dst] = _dp4a(val(args[1]), val(args[2]), val(args[3]), True, op.endswith("s32.s32"))
        elif op == "sub.f32":
            diff = val(args[1]).view(np.float32) - val(args[2]).view(np.float32)
            regs[dst] = diff.astype(np.float32).view(np.uint32)
        elif op == "mul.f32":
            prod = val(args[1]).view(np.float32) * val(args[2]).view(np.float32)
            regs[dst] = prod.astype(np.float32).view(np.uint32)
        else:
            raise AssertionError(f"instruction not modelled: {line}")
    return regs


