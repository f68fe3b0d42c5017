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


@pytest.mark.gpu
def test_greedy_argmax_is_the_kernel_on_cuda_and_torchs_on_cpu() -> None:
    from kernels import greedy_argmax
    from kernels.triton_ops.sampling import GreedyArgmax

    argmax = greedy_argmax("cuda", 1000, 8)
    assert isinstance(argmax, GreedyArgmax) and argmax.workspace.max_rows == 8
    assert greedy_argmax("cpu", 1000, 8) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("head_dim", "group", "num_kv_heads"), [(64, 4, 8), (32, 2, 4), (128, 4, 8)])
def test_decode_attention_heads_per_program_gives_the_same_bits_gpu(
    head_dim: int, group: int, num_kv_heads: int, dtype: torch.dtype
) -> None:
    """Several KV heads per decode program (block-diagonal query tiles: the extra products are
    exact zeros) give the bits of one head per program at the same partitions, unsplit (one
    partition of 2,048 tokens) and split (256, and 64 as small batches take), on W3's layout
    (llama3-1b: head dim 64, 8 KV heads of 4 query heads) and others. The partition is set:
    left to the kernel it depends on the program count, which the heads per program change."""
    from kernels import triton_ops as tops

    t = _checks.Target("cuda", dtype)
    gen = torch.Generator().manual_seed(5)
    lens = [1, 15, 16, 17, 300, 641, 1000, 33]
    b = _checks.make_paged_batch([(n, 1) for n in lens], num_kv_heads, group, head_dim, 16, t, gen,
                                 seq_len_slack=40)
    args = (b.q, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale, b.max_seq_len)
    for partition in (2048, 256, 64):
        one = tops.paged_decode_attention(*args, config=tops.DecodeConfig(partition, heads_per_program=1))
        for heads in (2, 4):
            many = tops.paged_decode_attention(
                *args, config=tops.DecodeConfig(partition, heads_per_program=heads))
            assert torch.equal(one, many), f"heads_per_program={heads} partition={partition}"
