"""The attention references against a naive per-sequence float64 attention (tiny shapes).

The reference computes in float32 whatever the input dtype (``.float()`` before SDPA), so it
matches the float64 loop to float32 rounding of values of order 1 (tolerance 1e-5).
"""

from __future__ import annotations

import math

import torch

from kernels import reference


def _naive_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: list[int],
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """float64 causal attention of one sequence's last ``len(q)`` positions, loop by loop."""
    q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(q_len, num_heads, head_dim, dtype=torch.float64)
    for i in range(q_len):
        pos = seq_len - q_len + i
        for h in range(num_heads):
            logits, values = [], []
            for t in range(pos + 1):
                blk, off = block_table[t // block_size], t % block_size
                k = key_cache[blk, off, h // group].double()
                logits.append(float(q[i, h].double() @ k) * scale)
                values.append(value_cache[blk, off, h // group].double())
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights)
            out[i, h] = sum(w * v for w, v in zip(weights, values, strict=True)) / total
    return out


def test_paged_attention_reference_matches_naive_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    block_size, num_kv_heads, group, head_dim = 4, 2, 2, 8
    specs = [(7, 3), (4, 1), (9, 9), (5, 1)]  # (seq_len, q_len): prefix chunk, boundary, fresh, decode
    num_blocks = 12
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen, dtype=torch.float64)
    value_cache = torch.randn(cache_shape, generator=gen, dtype=torch.float64)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [perm[3 * s : 3 * s + 3] for s in range(len(specs))]
    q_shape = (sum(ql for _, ql in specs), num_kv_heads * group, head_dim)
    q = torch.randn(q_shape, generator=gen, dtype=torch.float64)
    starts = [0]
    for _, ql in specs:
        starts.append(starts[-1] + ql)
    scale = head_dim**-0.5
    got = reference.paged_attention(
        q, key_cache, value_cache, torch.tensor(tables, dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32), torch.tensor([s for s, _ in specs], dtype=torch.int32),
        scale, max(ql for _, ql in specs), max(s for s, _ in specs),
    )
    for s, (seq_len, _) in enumerate(specs):
        rows = slice(starts[s], starts[s + 1])
        want = _naive_attention(q[rows], key_cache, value_cache, tables[s], seq_len, scale)
        torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5)


def test_decode_reference_is_prefill_with_one_row_per_sequence() -> None:
    gen = torch.Generator().manual_seed(1)
    key_cache = torch.randn(6, 4, 1, 8, generator=gen, dtype=torch.float64)
    value_cache = torch.randn(6, 4, 1, 8, generator=gen, dtype=torch.float64)
    tables = [[5, 0, 3], [1, 4, 2]]
    q = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)
    got = reference.paged_decode_attention(
        q, key_cache, value_cache, torch.tensor(tables, dtype=torch.int32),
        torch.tensor([9, 4], dtype=torch.int32), 0.3, 9,
    )
    for s, seq_len in enumerate([9, 4]):
        want = _naive_attention(q[s : s + 1], key_cache, value_cache, tables[s], seq_len, 0.3)
        torch.testing.assert_close(got[s : s + 1], want, rtol=1e-5, atol=1e-5)
