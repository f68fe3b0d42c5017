"""Programmatic dependent launch wiring on a machine without sm_90: which ops the Triton set
launches with it, that the CPU never asks for it, the engine flag that turns it off, and that
``pdl_begin`` compiles for sm_90 with the installed Triton into the launch-dependents
instruction, then the wait (``TRIGGER_FIRST``), or the other way round. (The kernels' bits
with PDL on are checked on the GPU, ``test_pdl_gpu.py``.)"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("triton")

from gpu_worker.__main__ import build_parser  # noqa: E402
from gpu_worker.config import EngineConfig  # noqa: E402
from kernels import get_ops  # noqa: E402
from kernels.triton_ops import gemv16_linear, triton_ops  # noqa: E402
from kernels.triton_ops.pdl import pdl_begin, pdl_launch, pdl_supported  # noqa: E402
from tests.kernels.sm90 import compile_sm90_or_skip  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _copy_after_wait(x_ptr, y_ptr, PDL: tl.constexpr):
    i = tl.arange(0, 128)
    pdl_begin(PDL)
    tl.store(y_ptr + i, tl.load(x_ptr + i))

DECODE_OPS = ("rms_norm", "fused_add_rms_norm", "rms_norm_fp8", "fused_add_rms_norm_fp8", "linear16",
              "linear16_gated", "fp8_weight_only_linear", "fp8_weight_only_gated_linear", "wna16_linear",
              "wna16_gated_linear", "wna16_rope_linear", "linear16_rope", "fp8_weight_only_rope_linear",
              "rotary_store_kvcache", "paged_decode_attention")


def test_triton_set_launches_exactly_the_decode_ops_with_pdl() -> None:
    chained, plain = triton_ops(pdl=True), triton_ops()
    for name in DECODE_OPS:
        assert getattr(chained, name).keywords == {"pdl": True}, name
        assert not hasattr(getattr(plain, name), "keywords"), name
    assert plain.linear16 is gemv16_linear
    for name in ("paged_attention", "fp8_linear", "silu_and_mul", "quantize_fp8_per_token", "store_kvcache"):
        assert not hasattr(getattr(chained, name), "keywords"), name


def test_pdl_needs_a_cuda_device_of_compute_capability_9(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.triton_ops import pdl

    assert not pdl_supported("cpu")
    assert get_ops("cpu", pdl=True).name == "reference"
    assert pdl_launch(False) == {}
    assert pdl.TRIGGER_FIRST  # the default (DECISIONS 153)
    assert pdl_launch(True) == {"PDL": 2, "launch_pdl": True}
    monkeypatch.setattr(pdl, "TRIGGER_FIRST", False)
    assert pdl_launch(True) == {"PDL": 1, "launch_pdl": True}


def test_enable_pdl_defaults_on_and_the_worker_flag_turns_it_off() -> None:
    assert EngineConfig().enable_pdl is True
    parser = build_parser(environ={})
    assert parser.parse_args(["--model", "m"]).enable_pdl is True
    assert parser.parse_args(["--model", "m", "--no-enable-pdl"]).enable_pdl is False
    from_env = build_parser(environ={"LLMSERVE_ENABLE_PDL": "false"})
    assert from_env.parse_args(["--model", "m"]).enable_pdl is False


def test_pdl_begin_compiles_to_launch_dependents_and_the_wait_in_order_for_sm90() -> None:
    """Compiled for an H100/H200 without one: every Triton we support (3.4 and up) must accept it
    (3.4's own ``tl.extra.cuda.gdc_wait`` does not compile: pdl.py's docstring). ``PDL`` 2
    (``TRIGGER_FIRST``): launch-dependents, then the wait; 1: the wait, then launch-dependents."""
    ptx = {pdl: _sm90_ptx(_copy_after_wait, {"x_ptr": "fp32", "y_ptr": "fp32"}, {"PDL": pdl})
           for pdl in (2, 1, False)}
    for pdl in (2, 1):
        wait, launch = ptx[pdl].find("griddepcontrol.wait"), ptx[pdl].find("griddepcontrol.launch_dependents")
        assert wait >= 0 and launch >= 0
        assert (launch < wait) == (pdl == 2)
        assert wait < ptx[pdl].find("ld.global")  # nothing is read before the wait here
    assert "griddepcontrol" not in ptx[False]


def _sm90_ptx(fn: Any, ptrs: dict[str, str], consts: dict[str, Any], floats: tuple[str, ...] = ()) -> str:
    """``fn`` compiled for sm_90 (PTX) on 2 warps, no alignment assumed; constexpr parameters
    not in ``consts`` take their defaults (as a launch does), other arguments int32 (float32 if
    in ``floats``)."""
    return str(compile_sm90_or_skip(fn, ptrs, consts, num_warps=2, floats=floats, aligned=False).asm["ptx"])


def _decode_partition_ptx(prefetch: bool) -> str:
    """Phase 1 of the decode attention compiled for sm_90 (llama3-8b's heads, bf16 cache)."""
    from kernels.triton_ops.decode_attention import _decode_partition_kernel

    ptrs = {"q_ptr": "bf16", "k_cache_ptr": "bf16", "v_cache_ptr": "bf16", "block_tables_ptr": "i32",
            "seq_lens_ptr": "i32", "out_ptr": "bf16", "part_out_ptr": "fp32", "part_m_ptr": "fp32",
            "part_l_ptr": "fp32", "k_scale_ptr": "fp32", "v_scale_ptr": "fp32"}
    consts = {"G": 4, "HEADS": 1, "BLOCK_G": 16, "BLOCK_SIZE": 16, "HEAD_DIM": 128, "BLOCK_N": 64,
              "ONE_SPLIT": False, "IEEE_DOT": False, "KV_FP8": False, "PDL": 2, "PREFETCH": prefetch}
    return _sm90_ptx(_decode_partition_kernel, ptrs, consts, ("qk_scale_log2",))


def test_decode_attention_prefetches_before_the_wait_and_reads_nothing_it_uses_for_sm90() -> None:
    """Phase 1's L2 prefetch (``decode_attention._prefetch_first_tile``) in the sm_90 code: the
    prefetches come before ``griddepcontrol.wait``; before it the program reads only past L1
    (``ld.global.cg``: the sequence length and block-table entries forming the addresses) and
    stores nothing; without the prefetch nothing at all comes before the wait."""
    import re

    ptx = _decode_partition_ptx(prefetch=True)
    wait = ptx.find("griddepcontrol.wait")
    before = ptx[:wait]
    assert wait > 0 and "prefetch.global.L2" in before
    assert "prefetch.global.L2" not in ptx[wait:]
    loads = re.findall(r"ld\.global[\w.]*", before)
    assert loads and all(op.startswith("ld.global.cg") for op in loads), loads
    assert "st.global" not in before and "cp.async" not in before
    plain = _decode_partition_ptx(prefetch=False)
    plain_before = plain[:plain.find("griddepcontrol.wait")]
    assert "prefetch" not in plain and "ld.global" not in plain_before
    # Phase 2 reads the sequence length (past L1) and nothing else before its wait.
    from kernels.triton_ops.decode_attention import _decode_reduce_kernel

    ptrs = {"seq_lens_ptr": "i32", "out_ptr": "bf16", "part_out_ptr": "fp32", "part_m_ptr": "fp32",
            "part_l_ptr": "fp32"}
    consts = {"HEAD_DIM": 128, "BLOCK_SPLITS": 32, "PDL": 2}
    for early, want in ((True, ["ld.global.cg.b32"]), (False, [])):
        ptx = _sm90_ptx(_decode_reduce_kernel, ptrs, consts | {"EARLY": early})
        before = ptx[:ptx.find("griddepcontrol.wait")]
        assert re.findall(r"ld\.global[\w.]*", before) == want and "st.global" not in before


def test_decode_attention_prefetches_only_with_pdl() -> None:
    from kernels.triton_ops import decode_attention
    from kernels.triton_ops.decode_attention import DecodeConfig, prefetches

    assert prefetches(DecodeConfig(), pdl=True) == decode_attention._PREFETCH
    assert prefetches(DecodeConfig(prefetch=True), pdl=True)
    assert not prefetches(DecodeConfig(), pdl=False)
    assert not prefetches(DecodeConfig(prefetch=True), pdl=False)
    assert not prefetches(DecodeConfig(prefetch=False), pdl=True)


def test_rotary_store_reads_only_its_position_slot_and_cos_sin_before_the_wait_for_sm90() -> None:
    """``rotary_store_kvcache``'s early inputs (``EARLY``) in the sm_90 code: before
    ``griddepcontrol.wait`` the program reads the position and slot past L1 and the cos/sin row
    (float32, at the position), and stores nothing; q, k and v (what the kernel before writes)
    come after it. Without ``EARLY`` nothing comes before the wait."""
    import re

    from kernels.triton_ops.rotary_kv import _rotary_store_kvcache_kernel

    ptrs = {"pos_ptr": "i64", "q_ptr": "bf16", "k_ptr": "bf16", "v_ptr": "bf16", "cos_sin_ptr": "fp32",
            "key_cache_ptr": "bf16", "value_cache_ptr": "bf16", "slot_ptr": "i64", "k_scale_ptr": "fp32",
            "v_scale_ptr": "fp32"}
    consts = {"HALF": 64, "BLOCK_HQ": 32, "BLOCK_HK": 8, "KV_FP8": False, "SOFT_FP8": False, "PDL": 2}
    early = _sm90_ptx(_rotary_store_kvcache_kernel, ptrs, consts | {"EARLY": True})
    before = early[:early.find("griddepcontrol.wait")]
    assert len(re.findall(r"ld\.global\.cg", before)) == 2  # the position and the slot
    assert "st.global" not in before
    # q's, k's and v's loads (bf16) are all after the wait: as many as without EARLY there.
    late = _sm90_ptx(_rotary_store_kvcache_kernel, ptrs, consts | {"EARLY": False})
    late_before, late_after = late[:late.find("griddepcontrol.wait")], late[late.find("griddepcontrol.wait"):]
    assert "ld.global" not in late_before
    after = early[early.find("griddepcontrol.wait"):]
    loads = len(re.findall(r"ld\.global", before)) + len(re.findall(r"ld\.global", after))
    assert loads == len(re.findall(r"ld\.global", late_after))
    assert len(re.findall(r"ld\.global", after)) < len(re.findall(r"ld\.global", late_after))


def test_qkv_gemv_with_rope_reads_only_host_inputs_weights_and_the_table_before_the_wait_for_sm90() -> None:
    """The one-token 4-bit GEMV with rotary + K/V store in its epilogue (``ROPE``), compiled for
    sm_90 with the engine's one-token settings: before ``griddepcontrol.wait`` it reads the
    position and the slot past L1 (``.cg``, the host writes them), its cos/sin (the constant
    table: two plain loads) and its first weight tile (evict-first), and stores nothing; the
    inputs, which the norm before it writes, are read after the wait (in inline PTX)."""
    import re

    from kernels.triton_ops.gemv import _gemv_int4_words_kernel

    ptrs = {"x_ptr": "bf16", "q_ptr": "i32", "s_ptr": "bf16", "o_ptr": "bf16", "bias_ptr": "bf16",
            "out_ptr": "bf16", "part_ptr": "fp32", "cnt_ptr": "i32", "pos_ptr": "i64", "cos_sin_ptr": "fp32",
            "slot_ptr": "i64", "kc_ptr": "bf16", "vc_ptr": "bf16"}
    consts = {"GROUP": 128, "SUB": 8.0, "HAS_OFFSET": False, "HAS_BIAS": False, "SPLIT": False, "BLOCK_N": 4,
              "BLOCK_K": 2048, "EVEN": True, "GATED": False, "ASM": True, "PAIRS": True, "PDL": 2,
              "PEEL": True, "XLOAD": True, "FIXUP": False, "ROPE": 64}
    ptx = _sm90_ptx(_gemv_int4_words_kernel, ptrs, consts)
    wait = ptx.find("griddepcontrol.wait")
    before, after = ptx[:wait], ptx[wait:]
    loads = re.findall(r"ld\.global[\w:.]*", before)
    assert wait > 0 and "st.global" not in before
    assert sum(op.startswith("ld.global.cg") for op in loads) == 2, loads  # position, slot
    # The rest: the weight tile (evict-first) and, plain, the cos/sin of the program's two rotary
    # pairs (at most four float32 values: nothing as wide as the inputs' 16-byte loads).
    plain = [op for op in loads if not op.startswith("ld.global.cg") and "evict_first" not in op]
    assert len(plain) <= 4 and all(op in ("ld.global.b32", "ld.global.v2.b32") for op in plain), loads
    assert any("evict_first" in op for op in loads), loads
    assert "ld.global.v4.b32 {a, b, c, d}" in after  # the inputs (xload), after the wait
