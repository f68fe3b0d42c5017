"""Programmatic dependent launch wiring on a machine without sm_90: which ops the Triton set
launches with it, that the CPU never asks for it, the engine flag that turns it off, and that
``pdl_begin`` compiles for sm_90 with the installed Triton into the wait, then the
launch-dependents instruction. (The kernels' bits with PDL on are checked on the GPU,
``test_pdl_gpu.py``.)"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from gpu_worker.__main__ import build_parser  # noqa: E402
from gpu_worker.config import EngineConfig  # noqa: E402
from kernels import get_ops  # noqa: E402
from kernels.triton_ops import gemv16_linear, triton_ops  # noqa: E402
from kernels.triton_ops.pdl import pdl_begin, pdl_launch, pdl_supported  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _copy_after_wait(x_ptr, y_ptr, PDL: tl.constexpr):
    i = tl.arange(0, 128)
    pdl_begin(PDL)
    tl.store(y_ptr + i, tl.load(x_ptr + i))

DECODE_OPS = ("rms_norm", "fused_add_rms_norm", "rms_norm_fp8", "fused_add_rms_norm_fp8", "linear16",
              "linear16_gated", "fp8_weight_only_linear", "fp8_weight_only_gated_linear", "wna16_linear",
              "wna16_gated_linear", "rotary_store_kvcache", "paged_decode_attention")


def test_triton_set_launches_exactly_the_decode_ops_with_pdl() -> None:
    chained, plain = triton_ops(pdl=True), triton_ops()
    for name in DECODE_OPS:
        assert getattr(chained, name).keywords == {"pdl": True}, name
        assert not hasattr(getattr(plain, name), "keywords"), name
    assert plain.linear16 is gemv16_linear
    for name in ("paged_attention", "fp8_linear", "silu_and_mul", "quantize_fp8_per_token", "store_kvcache"):
        assert not hasattr(getattr(chained, name), "keywords"), name


def test_pdl_needs_a_cuda_device_of_compute_capability_9() -> None:
    assert not pdl_supported("cpu")
    assert get_ops("cpu", pdl=True).name == "reference"
    assert pdl_launch(False) == {}
    assert pdl_launch(True) == {"PDL": True, "launch_pdl": True}


def test_enable_pdl_defaults_on_and_the_worker_flag_turns_it_off() -> None:
    assert EngineConfig().enable_pdl is True
    parser = build_parser(environ={})
    assert parser.parse_args(["--model", "m"]).enable_pdl is True
    assert parser.parse_args(["--model", "m", "--no-enable-pdl"]).enable_pdl is False
    from_env = build_parser(environ={"LLMSERVE_ENABLE_PDL": "false"})
    assert from_env.parse_args(["--model", "m"]).enable_pdl is False


def test_pdl_begin_compiles_to_the_wait_then_launch_dependents_for_sm90() -> None:
    """Compiled for an H100/H200 without one: every Triton we support (3.4 and up) must accept it
    (3.4's own ``tl.extra.cuda.gdc_wait`` does not compile: pdl.py's docstring)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptx = {}
    for pdl in (True, False):
        sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "PDL": "constexpr"}
        src = ASTSource(_copy_after_wait, sig, {"PDL": pdl})
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        except (RuntimeError, FileNotFoundError) as exc:  # no CUDA toolchain in this Triton build
            pytest.skip(f"cannot compile for sm_90 here: {exc}")
        ptx[pdl] = kernel.asm["ptx"]
    wait, launch = ptx[True].find("griddepcontrol.wait"), ptx[True].find("griddepcontrol.launch_dependents")
    assert 0 <= wait < launch
    assert wait < ptx[True].find("ld.global")  # nothing is read before the wait here
    assert "griddepcontrol" not in ptx[False]
