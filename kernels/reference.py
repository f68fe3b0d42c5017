"""Plain torch reference implementations of every kernel op.

Each Triton kernel in ``kernels.triton_ops`` has the same signature as its reference
here; tests compare the two on random inputs. The CPU engine runs on these.

KV cache layout (shared by every op): ``key_cache``/``value_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a sequence lives in
slot ``block_table[t // block_size] * block_size + t % block_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, returned in ``x.dtype``."""
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps)).to(x.dtype) * weight


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(x + residual), x + residual)``.

    Kernels may compute in place (overwriting ``x`` and ``residual``); callers must not
    reuse the inputs afterwards.
    """
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dim ``2d``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply NeoX-style (rotate-half) rotary embedding, as HF Llama does.

    positions: ``[T]`` int64; q: ``[T, Hq, D]``; k: ``[T, Hk, D]``;
    cos_sin_cache: ``[max_positions, D]`` float32, ``cos`` in the first ``D/2`` columns and
    ``sin`` in the last ``D/2`` (any rope scaling is already folded into it).
    Returns the rotated ``(q, k)``; kernels may rotate in place and return the inputs.
    """
    cos_sin = cos_sin_cache.index_select(0, positions)
    half = cos_sin.shape[-1] // 2
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` (``[T, Hk, D]``) into cache slots ``slot_mapping`` (``[T]``).

    A negative slot means "do not store" (padding tokens).
    """
    num_kv_heads, head_dim = key_cache.shape[-2:]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
) -> torch.Tensor:
    """Causal attention of variable-length query chunks over their paged context.

    q: ``[T, Hq, D]``, the new tokens of ``S`` sequences packed back to back; sequence
    ``s`` owns rows ``query_start_loc[s]:query_start_loc[s+1]`` (``query_start_loc``:
    ``[S+1]`` int32). seq_lens: ``[S]`` int32, context length of each sequence *including*
    its new tokens, whose K/V must already be in the cache: the ``ql`` query rows of a
    sequence are its last ``ql`` positions. block_tables: ``[S, >= ceil(max_seq_len /
    block_size)]`` int32. Hq must be a multiple of Hk (GQA). Returns ``[T, Hq, D]``.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    device = q.device
    seq_lens_l = seq_lens.long()
    starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - starts

    # Gather each sequence's context into a padded [S, L, Hk, D] view of the cache.
    kpos = torch.arange(max_seq_len, device=device)
    slots = block_tables[:, kpos // block_size].long() * block_size + kpos % block_size
    k = key_cache.view(-1, num_kv_heads, head_dim)[slots]
    v = value_cache.view(-1, num_kv_heads, head_dim)[slots]

    # Scatter the packed queries into a padded [S, Qmax, Hq, D] tensor.
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens)
    row = torch.arange(num_tokens, device=device) - starts[seq_idx]
    qp = q.new_zeros(num_seqs, max_query_len, num_heads, head_dim)
    qp[seq_idx, row] = q

    # Query row i of sequence s sits at position seq_len - q_len + i; it sees keys <= it.
    qpos = (seq_lens_l - q_lens)[:, None] + torch.arange(max_query_len, device=device)[None, :]
    mask = kpos[None, None, :] <= qpos[:, :, None]  # [S, Qmax, L]
    mask &= kpos[None, None, :] < seq_lens_l[:, None, None]

    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2).float(),
        k.transpose(1, 2).float(),
        v.transpose(1, 2).float(),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [S, Hq, Qmax, D]
    return out.transpose(1, 2)[seq_idx, row].to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """Decode attention: one query token per sequence, at position ``seq_lens[s] - 1``.

    q: ``[S, Hq, D]``; other arguments as in :func:`paged_attention`. Returns ``[S, Hq, D]``.
    """
    num_seqs = q.shape[0]
    query_start_loc = torch.arange(num_seqs + 1, device=q.device, dtype=torch.int32)
    return paged_attention(
        q, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, 1, max_seq_len
    )
