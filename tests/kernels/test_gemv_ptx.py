"""The one-token 4-bit word GEMV's inline PTX (``kernels/triton_ops/gemv_ptx.py``) without a GPU, run
by the interpreter of ``ptx_model.py``:

- the packed decode (``pairs_ptx``, bf16 and float16 inputs): each word's eight nibbles meet the
  right inputs (small integers: every product and sum exact, so the result must be too), and
  random inputs stay within the stated roundings of ``sum (q_i - 8) x_i`` (float16: a sixteenth);
- the input loads: eight 16-bit inputs regrouped into the pairs ``(x_r, x_{r+4})`` the decode
  takes (``pair_loads_ptx``), or as float32 (``input_loads_ptx``, the float32 decode's);
- the scale loads (``_GROUP_LOAD_*``): bf16, float16 and float32 scales read as float32;
- the integer decode (``limbs_ptx`` then ``dp4a_ptx``, one or two words at a time, bf16 and
  float16 inputs): exact for
  inputs that fit its 16-bit fixed point, within ``2^-15 max |x| sum |q - 8|`` otherwise, NaN
  for an input that is not finite, 0 for zero inputs;
- compiled for sm_90, the loop of the ``xload`` kernel moves nothing through shared memory.
The whole kernel against the torch reference runs on a card (``quant_kernel_checks``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.triton_ops import gemv, gemv_ptx  # noqa: E402
from tests.kernels.ptx_model import _LANES, MODELLED, opcodes, run_ptx  # noqa: E402
from tests.kernels.sm90 import compile_sm90_or_skip  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _bits16(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)


def _pair_operands(q: np.ndarray, x: torch.Tensor) -> dict[int, np.ndarray]:
    """Word ``$1`` (input ``i`` in bits ``4 i .. 4 i + 3``) and pairs ``$2 .. $5`` = ``(x_r, x_{r+4})``
    per lane, from nibbles ``q`` ``[lanes, 8]`` and inputs ``x`` ``[lanes, 8]``."""
    word = np.zeros(_LANES, dtype=np.uint32)
    for i in range(8):
        word |= q[:, i].astype(np.uint32) << (4 * i)
    xb = _bits16(x)
    return {1: word, **{2 + r: xb[:, r] | (xb[:, r + 4] << 16) for r in range(4)}}


@pytest.mark.parametrize("act", ["bf16", "fp16"])
def test_pairs_program_pairs_each_nibble_with_its_input(act: str) -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (_LANES, 8), generator=gen).numpy()
    x = torch.randint(-4, 5, (_LANES, 8), generator=gen).to(_DTYPES[act])  # every sum exact
    got = run_ptx(gemv_ptx.pairs_ptx(act), _pair_operands(q, x))["$0"].view(np.float32).astype(np.float64)
    want = ((q - 8.0) * x.double().numpy()).sum(axis=1) / (16.0 if act == "fp16" else 1.0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("act", ["bf16", "fp16"])
def test_pairs_program_rounds_as_documented(act: str) -> None:
    """Products and four-term sums rounded to the inputs' dtype: within four roundings of each
    term (the bound ``assert_wna16_gemv_close(roundings=4)`` gives the kernel)."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randint(0, 16, (_LANES, 8), generator=gen).numpy()
    x = (torch.randn(_LANES, 8, generator=gen) * 3).to(_DTYPES[act])
    got = run_ptx(gemv_ptx.pairs_ptx(act), _pair_operands(q, x))["$0"].view(np.float32).astype(np.float64)
    terms = (q - 8.0) * x.double().numpy()
    scale = 16.0 if act == "fp16" else 1.0
    u = {"bf16": 2.0**-8, "fp16": 2.0**-11}[act]
    err = np.abs(got * scale - terms.sum(axis=1))
    assert (err <= 4 * u * np.abs(terms).sum(axis=1) + 1e-30).all(), err.max()


def test_pair_loads_regroup_the_inputs() -> None:
    x = torch.randn(_LANES, 8, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    memory = x.view(torch.uint8).numpy().tobytes()
    regs = run_ptx(gemv_ptx.pair_loads_ptx(), {4: np.arange(_LANES, dtype=np.uint32) * 16}, memory)
    xb = _bits16(x)
    for r in range(4):
        np.testing.assert_array_equal(regs[f"${r}"], xb[:, r] | (xb[:, r + 4] << 16))


@pytest.mark.parametrize("act", ["bf16", "fp16"])
def test_input_loads_read_eight_inputs_as_float32(act: str) -> None:
    x = torch.randn(_LANES, 8, generator=torch.Generator().manual_seed(9)).to(_DTYPES[act])
    regs = run_ptx(gemv_ptx.input_loads_ptx(act), {8: np.arange(_LANES, dtype=np.uint32) * 16},
                   x.view(torch.uint8).numpy().tobytes())
    for i in range(8):
        np.testing.assert_array_equal(regs[f"${i}"].view(np.float32), x[:, i].float().numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_group_loads_read_scales_as_float32(dtype: torch.dtype) -> None:
    s = (torch.rand(_LANES, generator=torch.Generator().manual_seed(8)) * 0.02 + 0.001).to(dtype)
    ptx = {torch.bfloat16: gemv_ptx._GROUP_LOAD_BF16, torch.float16: gemv_ptx._GROUP_LOAD_F16,
           torch.float32: gemv_ptx._GROUP_LOAD_F32}[dtype].value
    regs = run_ptx(ptx, {1: np.arange(_LANES, dtype=np.uint32) * s.element_size()},
                   s.view(torch.uint8).numpy().tobytes())
    np.testing.assert_array_equal(regs["$0"].view(np.float32), s.float().numpy())


def _dp4a_sums(q: np.ndarray, x: torch.Tensor, words: int) -> np.ndarray:
    """``sum (q - 8) x`` per lane by the integer decode: ``limbs_ptx(words)`` on the 16-bit inputs
    ``x`` ``[lanes, 8 words]`` in memory, then ``dp4a_ptx(words)`` on the words of nibbles ``q``
    ``[lanes, 8 words]`` (the operands numbered as ``inline_asm_elementwise`` does with
    ``pack=words``: result-major, then each operand's ``words`` values)."""
    memory = x.contiguous().view(torch.uint8).numpy().tobytes()
    lanes = np.arange(_LANES, dtype=np.uint32) * 16 * words
    ops = {5 * words + u: lanes + 16 * u for u in range(words)}
    ops |= {6 * words + u: np.zeros(_LANES, dtype=np.uint32) for u in range(words)}  # the PDL token
    act = "fp16" if x.dtype == torch.float16 else "bf16"
    limbs = run_ptx(gemv_ptx.limbs_ptx(words, act), ops, memory)
    ops = {}
    for u in range(words):
        word = np.zeros(_LANES, dtype=np.uint32)
        for i in range(8):
            word |= q[:, 8 * u + i].astype(np.uint32) << (4 * i)
        ops[words + u] = word
        for operand in range(5):  # lo of even inputs, lo of odd, hi of even, hi of odd, the unit
            ops[words + (operand + 1) * words + u] = limbs[f"${operand * words + u}"]
    out = run_ptx(gemv_ptx.dp4a_ptx(words), ops)
    for u in range(1, words):  # the sum is the first word's result, the others are 0
        np.testing.assert_array_equal(out[f"${u}"], 0)
    return out["$0"].view(np.float32).astype(np.float64)


@pytest.mark.parametrize("act", ["bf16", "fp16"])
@pytest.mark.parametrize("words", [1, 2])
def test_dp4a_program_pairs_each_nibble_with_its_input(words: int, act: str) -> None:
    """Small-integer inputs fit the 16-bit fixed point exactly, so every sum must be exact."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(0, 16, (_LANES, 8 * words), generator=gen).numpy()
    x = torch.randint(-4, 5, (_LANES, 8 * words), generator=gen).to(_DTYPES[act])
    x[:, 0] = 3  # no lane of zeros
    want = ((q - 8.0) * x.double().numpy()).sum(axis=1)
    np.testing.assert_array_equal(_dp4a_sums(q, x, words), want)


# Per input dtype: scales of the inputs tried (bf16 over eleven decades, float16 across its
# subnormals to near its largest values), and the magnitude below which inputs share the
# fixed point of the exponent floor (bf16 2^-108, float16 its smallest normal 2^-14).
_DP4A_SCALES = {"bf16": ((1e-6, 1e-3, 0.5, 3.0, 1e2, 1e4), 2.0**-108),
                "fp16": ((1e-6, 1e-3, 0.5, 3.0, 10.0), 2.0**-14)}


@pytest.mark.parametrize("act", ["bf16", "fp16"])
@pytest.mark.parametrize("words", [1, 2])
def test_dp4a_program_rounds_as_documented(words: int, act: str) -> None:
    """Each input rounds to 16-bit fixed point under the largest of its words' magnitudes: within
    ``2^-15 max |x| sum |q - 8|`` (and float32's last roundings), over the scales above and with
    one input of each lane a thousand times its neighbours."""
    gen = torch.Generator().manual_seed(12)
    scales, lowest = _DP4A_SCALES[act]
    for scale in scales:
        for outlier in (False, True):
            q = torch.randint(0, 16, (_LANES, 8 * words), generator=gen).numpy()
            x = torch.randn(_LANES, 8 * words, generator=gen) * scale
            if outlier:
                x[:, 3] *= 1000
            x = x.to(_DTYPES[act])
            xd = x.double().numpy()
            terms = (q - 8.0) * xd
            err = np.abs(_dp4a_sums(q, x, words) - terms.sum(axis=1))
            bound = 2.0**-15 * np.maximum(np.abs(xd).max(axis=1), lowest) * np.abs(q - 8.0).sum(axis=1)
            bound = bound * (1 + 2.0**-20) + 2.0**-23 * np.abs(terms).sum(axis=1)
            assert (err <= bound).all(), (scale, outlier)


@pytest.mark.parametrize("act", ["bf16", "fp16"])
@pytest.mark.parametrize("words", [1, 2])
def test_dp4a_program_keeps_nan_and_zero(words: int, act: str) -> None:
    gen = torch.Generator().manual_seed(13)
    q = torch.randint(0, 16, (_LANES, 8 * words), generator=gen).numpy()
    x = torch.randn(_LANES, 8 * words, generator=gen).to(_DTYPES[act])
    x[0, 2], x[1, 8 * words - 1], x[2, 5] = float("nan"), float("inf"), float("-inf")
    x[3:6] = 0
    got = _dp4a_sums(q, x, words)
    assert np.isnan(got[:3]).all()
    np.testing.assert_array_equal(got[3:6], 0)
    assert np.isfinite(got[6:]).all()


def test_programs_use_only_modelled_instructions() -> None:
    programs = [gemv_ptx.pairs_ptx("bf16"), gemv_ptx.pairs_ptx("fp16"), gemv_ptx.pair_loads_ptx(),
                *(gemv_ptx.limbs_ptx(words, act) for words in (1, 2) for act in ("bf16", "fp16")),
                gemv_ptx.dp4a_ptx(1), gemv_ptx.dp4a_ptx(2),
                gemv_ptx.input_loads_ptx("bf16"), gemv_ptx.input_loads_ptx("fp16"),
                gemv_ptx._GROUP_LOAD_BF16.value, gemv_ptx._GROUP_LOAD_F16.value,
                gemv_ptx._GROUP_LOAD_F32.value]
    for ptx in programs:
        assert opcodes(ptx) <= MODELLED, opcodes(ptx) - MODELLED


@pytest.mark.parametrize(("x_dtype", "pairs", "dp4a"),
                         [("bf16", True, 0), ("fp16", True, 0), ("bf16", False, 0), ("bf16", True, 2),
                          ("fp16", True, 2)],
                         ids=["bf16-pairs", "fp16-pairs", "bf16-offsets", "bf16-dp4a", "fp16-dp4a"])
def test_xload_loop_moves_nothing_through_shared_memory(x_dtype: str, pairs: bool, dp4a: int) -> None:
    """Inputs and scales read in PTX take the word tile's layout: no layout conversion (shared
    memory and barriers) in the loop, where ``tl.load`` of the same inputs put eight."""
    fn = gemv._gemv_int4_words_kernel
    ptrs = dict(x_ptr=x_dtype, q_ptr="i32", s_ptr="fp16", o_ptr="fp16", bias_ptr="fp16",
                out_ptr=x_dtype, part_ptr="fp32", cnt_ptr="i32")
    consts = dict(GROUP=128, SUB=8.0 if pairs else 0.0, HAS_OFFSET=not pairs, HAS_BIAS=False, SPLIT=False,
                  BLOCK_N=8, BLOCK_K=2048, EVEN=True, GATED=False, ASM=True, PAIRS=pairs, PDL=True, PEEL=True,
                  XLOAD=True, FIXUP=False, ROPE=0, DP4A=dp4a)
    kernel = compile_sm90_or_skip(fn, ptrs, consts, num_warps=4)
    ttgir = kernel.asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for"): ttgir.index("scf.yield")]
    assert "ttg.convert_layout" not in loop and "ttg.local_" not in loop
    assert len(re.findall("tt.elementwise_inline_asm", loop)) >= 3  # inputs, decode, scales (offsets)
