"""How many KV heads one decode-attention program takes and how long its partitions are (host
ints only).

The kernel is checked against the reference for several heads per program in
``kernel_checks.py`` (CPU interpreter, float32) and bit for bit against one head per program
on the GPU (``test_triton_ops_gpu.py``); this pins the default choice.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from kernels.triton_ops.decode_attention import (  # noqa: E402
    DecodeConfig,
    _choose_tiles,
    _heads_per_program,
)


@pytest.mark.parametrize(
    ("head_dim", "num_kv_heads", "heads"),
    [
        (128, 8, 1),  # llama3-8b: 256-byte rows already
        (64, 8, 2),  # llama3-1b (W3): two heads make 128 dims
        (32, 4, 4),
        (16, 2, 2),  # 8 would make 128 dims; cut to a divisor of the KV heads
        (64, 3, 1),  # 2 does not divide 3
        (64, 1, 1),
    ],
)
def test_default_heads_per_program_make_128_dims_where_the_kv_heads_divide(
    head_dim: int, num_kv_heads: int, heads: int
) -> None:
    assert _heads_per_program(DecodeConfig(), num_kv_heads, head_dim) == heads


def test_configured_heads_per_program_is_cut_to_a_divisor() -> None:
    assert _heads_per_program(DecodeConfig(heads_per_program=1), 8, 64) == 1
    assert _heads_per_program(DecodeConfig(heads_per_program=4), 8, 128) == 4
    assert _heads_per_program(DecodeConfig(heads_per_program=4), 2, 64) == 2


def test_heads_per_program_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        DecodeConfig(heads_per_program=3)
    with pytest.raises(ValueError, match="power of two"):
        DecodeConfig(heads_per_program=0)


@pytest.mark.parametrize(
    ("groups", "max_seq_len", "partition"),
    [
        (8, 2048, 64),  # W2: batch 1 x 8 KV heads under a 2,048-token bound: 32 partitions of 64
        (8, 8192, 128),  # the same at 8,192: splits stay about _TARGET_PROGRAMS / groups
        (8, 131072, 2048),
        (64, 2048, 256),  # batch 8: 8 splits
        (512, 2048, 2048),  # enough programs: one partition
        (2048, 100, 128),  # a short bound: one partition
    ],
)
def test_default_partitions_split_small_batches_down_to_64_tokens(groups: int, max_seq_len: int,
                                                                   partition: int) -> None:
    assert _choose_tiles(DecodeConfig(), groups, max_seq_len, 2) == (partition, 64)
