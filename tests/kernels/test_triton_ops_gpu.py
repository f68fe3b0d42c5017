"""Every Triton kernel against its torch reference on a CUDA GPU (bf16 and float32).

Same checks as the interpreted tests (``kernel_checks.py``) plus longer contexts that span
several decode partitions and prefill tiles.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("triton")


def _load_checks() -> ModuleType:
    path = Path(__file__).resolve().parent / "kernel_checks.py"
    spec = importlib.util.spec_from_file_location("llmserve_kernel_checks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_checks = _load_checks()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kernel", sorted(_checks.CHECKS))
def test_kernel_matches_reference_gpu(kernel: str, dtype: torch.dtype) -> None:
    _checks.CHECKS[kernel](_checks.Target("cuda", dtype, big=True))


@pytest.mark.gpu
def test_get_ops_picks_triton_on_cuda() -> None:
    from kernels import get_ops

    assert get_ops("cuda").name == "triton"
