"""The attention references against a naive per-sequence float64 attention (tiny shapes).

The reference computes in float32 whatever the input dtype (``.float()`` before SDPA), so it
matches the float64 loop to float32 rounding of values of order 1 (tolerance 1e-5).
"""

from __future__ import annotations

import math

import pytest
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


def _step(gen: torch.Generator, specs: list[tuple[int, int]], block_size: int, num_blocks: int,
          num_kv_heads: int, group: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Random caches, block tables (stale entries past each sequence) and packed queries."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(-(-s // block_size) for s, _ in specs) + 1
    tables = perm[: len(specs) * width].view(len(specs), width).to(torch.int32)
    starts = [0]
    for _, ql in specs:
        starts.append(starts[-1] + ql)
    slots = []
    for s, (seq_len, q_len) in enumerate(specs):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(tables[s, pos // block_size]) * block_size + pos % block_size)
    num_tokens = starts[-1]
    return {
        "key_cache": torch.randn(shape, generator=gen),
        "value_cache": torch.randn(shape, generator=gen),
        "q": torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen),
        "k": torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen),
        "v": torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen),
        "block_tables": tables,
        "query_start_loc": torch.tensor(starts, dtype=torch.int32),
        "seq_lens": torch.tensor([s for s, _ in specs], dtype=torch.int32),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
    }


@pytest.mark.parametrize(
    "specs",
    [
        [(7, 3), (4, 1), (9, 9), (5, 1)],  # mixed: prefix chunk, decode, fresh prompt
        [(9, 1), (3, 1), (17, 1)],  # decode, lengths differ (mask)
        [(6, 1), (6, 1)],  # decode, one length (no mask)
        [(13, 13)],  # one fresh prompt (is_causal)
        [(12, 4), (12, 4)],  # uniform chunks after a prefix (mask, no scatter)
    ],
)
def test_planned_attention_equals_store_then_paged_attention(specs: list[tuple[int, int]]) -> None:
    gen = torch.Generator().manual_seed(2)
    t = _step(gen, specs, block_size=4, num_blocks=24, num_kv_heads=2, group=3, head_dim=8)
    scale = 8**-0.5
    max_q, max_s = max(ql for _, ql in specs), max(s for s, _ in specs)
    want_k, want_v = t["key_cache"].clone(), t["value_cache"].clone()
    reference.store_kvcache(t["k"], t["v"], want_k, want_v, t["slot_mapping"])
    want = reference.paged_attention(
        t["q"], want_k, want_v, t["block_tables"], t["query_start_loc"], t["seq_lens"], scale, max_q, max_s
    )
    plan = reference.plan_paged_attention(
        t["slot_mapping"], t["block_tables"], t["query_start_loc"], t["seq_lens"], 4, max_q, max_s
    )
    for _layer in range(2):  # one plan, several layers (each with its own cache)
        key_cache, value_cache = t["key_cache"].clone(), t["value_cache"].clone()
        got = reference.paged_attention_with_plan(
            t["q"], t["k"], t["v"], key_cache, value_cache, plan, scale
        )
        torch.testing.assert_close(key_cache, want_k, rtol=0, atol=0)
        torch.testing.assert_close(value_cache, want_v, rtol=0, atol=0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if max_q == 1:  # and decode agrees with the naive loop
        for s, (seq_len, _) in enumerate(specs):
            table = t["block_tables"][s].tolist()
            naive = _naive_attention(t["q"][s : s + 1], want_k, want_v, table, seq_len, scale)
            torch.testing.assert_close(got[s : s + 1].double(), naive, rtol=1e-5, atol=1e-5)


def test_planned_store_skips_negative_slots() -> None:
    gen = torch.Generator().manual_seed(3)
    t = _step(gen, [(5, 1), (8, 1), (3, 1)], block_size=4, num_blocks=12, num_kv_heads=1, group=2, head_dim=4)
    slots = t["slot_mapping"].clone()
    slots[1] = -1  # a padding row: not stored
    plan = reference.plan_paged_attention(
        slots, t["block_tables"], t["query_start_loc"], t["seq_lens"], 4, 1, 8
    )
    want_k, want_v = t["key_cache"].clone(), t["value_cache"].clone()
    reference.store_kvcache(t["k"], t["v"], want_k, want_v, slots)
    reference.paged_attention_with_plan(t["q"], t["k"], t["v"], t["key_cache"], t["value_cache"], plan, 0.5)
    assert torch.equal(t["key_cache"], want_k) and torch.equal(t["value_cache"], want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_hf_rotate_half_bit_for_bit(dtype: torch.dtype) -> None:
    """``q * cos + rotate_half(q) * sin`` as HF writes it (in float32), whether planned or not."""
    gen = torch.Generator().manual_seed(4)
    cache = torch.randn(50, 16, generator=gen)
    positions = torch.randint(0, 50, (6,), generator=gen)
    qkv = torch.randn(6, 6 * 16, generator=gen).to(dtype)
    q, k = qkv[:, : 4 * 16].view(6, 4, 16), qkv[:, 4 * 16 :].view(6, 2, 16)  # strided, like the model's
    cos_sin = cache[positions]
    cos = torch.cat((cos_sin[:, :8], cos_sin[:, :8]), dim=-1)[:, None]
    sin = torch.cat((cos_sin[:, 8:], cos_sin[:, 8:]), dim=-1)[:, None]

    def hf(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rotated = torch.cat((-xf[..., 8:], xf[..., :8]), dim=-1)
        return (xf * cos + rotated * sin).to(dtype)

    plan = reference.plan_rotary_embedding(positions, cache)
    for got_q, got_k in (
        reference.rotary_embedding(positions, q, k, cache),
        reference.rotary_embedding_with_plan(q, k, plan),
    ):
        assert torch.equal(got_q, hf(q)) and torch.equal(got_k, hf(k))
        assert got_q.dtype == dtype
