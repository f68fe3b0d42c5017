"""Plain torch reference implementations of every kernel op.

Each Triton kernel in ``kernels.triton_ops`` has the same signature as its reference
here; tests compare the two on random inputs. The CPU engine runs on these.

KV cache layout (shared by every op): ``key_cache``/``value_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a sequence lives in
slot ``block_table[t // block_size] * block_size + t % block_size``.

FP8 KV cache: caches of dtype ``float8_e4m3fn`` hold ``e4m3(x / scale)`` with float32 scales
``k_scale``/``v_scale`` of shape ``[1]`` (per tensor) or ``[num_kv_heads]`` (per head), given
to every op that reads or writes the cache (keyword-only; ignored for 16/32-bit caches).
Stores quantize as :func:`kernels.quant_reference.quantize_fp8_with_scale`; attention reads
``e4m3 value * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.quant_reference import FP8_DTYPE, Fp8Activation, quantize_fp8_with_scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, returned in ``x.dtype``."""
    xf = x if x.dtype == torch.float32 else x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    normed = xf * var.add_(eps).rsqrt_()
    if normed.dtype != x.dtype:
        normed = normed.to(x.dtype)
    # In place when that keeps the result dtype (same products as ``normed * weight``).
    return normed.mul_(weight) if weight.dtype == normed.dtype else normed * weight


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
    return F.silu(x[..., :d]).mul_(x[..., d:])


# Fused with the per-token fp8 quantization of the result, for an fp8 (W8A8) linear that takes
# it next: exactly the op, then Fp8Activation.of (kernels may skip writing the 16-bit result).


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Fp8Activation:
    """:func:`rms_norm` quantized per token (:meth:`Fp8Activation.of`)."""
    return Fp8Activation.of(rms_norm(x, weight, eps))


def fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[Fp8Activation, torch.Tensor]:
    """:func:`fused_add_rms_norm` with its normalised output quantized per token."""
    out, summed = fused_add_rms_norm(x, residual, weight, eps)
    return Fp8Activation.of(out), summed


def silu_and_mul_fp8(x: torch.Tensor) -> Fp8Activation:
    """:func:`silu_and_mul` quantized per token."""
    return Fp8Activation.of(silu_and_mul(x))


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply NeoX-style (rotate-half) rotary embedding, as HF Llama does.

    positions: ``[T]`` int64; q: ``[T, Hq, D]``; k: ``[T, Hk, D]``;
    cos_sin_cache: ``[max_positions, D]`` float32, ``cos`` in the first ``D/2`` columns and
    ``sin`` in the last ``D/2`` (any rope scaling is already folded into it).
    Returns the rotated ``(q, k)``; kernels may rotate in place and return the inputs.
    """
    return rotary_embedding_with_plan(q, k, plan_rotary_embedding(positions, cos_sin_cache))


@dataclass(frozen=True)
class RotaryPlan:
    """The cos/sin rows of one step's positions, shared by every layer.

    ``x * cos + swap_halves(x) * sin`` is the rotation: ``sin`` carries the sign of
    rotate-half (``-sin`` in the first half), so the products and sums are HF's, bit for bit.
    """

    cos: torch.Tensor  # [T, 1, D] float32: (cos, cos)
    sin: torch.Tensor  # [T, 1, D] float32: (-sin, sin)


def plan_rotary_embedding(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> RotaryPlan:
    """Gather the cos/sin rows of ``positions`` once per step (see :func:`rotary_embedding`)."""
    cos_sin = cos_sin_cache.index_select(0, positions)
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    return RotaryPlan(cos=torch.cat((cos, cos), dim=-1), sin=torch.cat((-sin, sin), dim=-1))


def rotary_embedding_with_plan(
    q: torch.Tensor, k: torch.Tensor, plan: RotaryPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rotary_embedding` with the cos/sin rows gathered by :func:`plan_rotary_embedding`."""
    return _rotate(q, plan), _rotate(k, plan)


def _rotate(x: torch.Tensor, plan: RotaryPlan) -> torch.Tensor:
    xf = x if x.dtype == torch.float32 else x.float()
    num_tokens, num_heads, head_dim = xf.shape
    swapped = xf.unflatten(-1, (2, head_dim // 2)).flip(-2).flatten(-2)  # (x2, x1)
    out = (xf * plan.cos).add_(swapped.mul_(plan.sin))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write ``key``/``value`` (``[T, Hk, D]``) into cache slots ``slot_mapping`` (``[T]``).

    A negative slot means "do not store" (padding tokens). fp8 caches need ``k_scale`` and
    ``v_scale`` (module docstring).
    """
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    _write_slots(key_cache, slot_mapping, key, k_scale)
    _write_slots(value_cache, slot_mapping, value, v_scale)


def _write_slots(
    cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None
) -> None:
    num_kv_heads, head_dim = cache.shape[-2:]
    values = to_cache(x, cache, scale)
    if cache.dtype == FP8_DTYPE:  # index_copy_ has no float8 kernel: copy the bytes
        cache, values = cache.view(torch.uint8), values.view(torch.uint8)
    cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, values)


def to_cache(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` (``[T, Hk, D]``) as ``cache`` stores it: cast, or quantized with ``scale`` for fp8."""
    if cache.dtype != FP8_DTYPE:
        return x.to(cache.dtype)
    if scale is None:
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    return quantize_fp8_with_scale(x, scale.reshape(-1, 1))


def from_cache(ctx: torch.Tensor, scale: torch.Tensor | None, head_dim: int = 1) -> torch.Tensor:
    """Float32 values of cache entries ``ctx`` (fp8: times ``scale`` per KV head, the KV-head
    dim of ``ctx`` being ``head_dim``)."""
    ctx = ctx if ctx.dtype == torch.float32 else ctx.float()
    if scale is None:
        return ctx
    shape = [1] * ctx.dim()
    shape[head_dim] = -1
    return ctx * scale.float().reshape(shape)


def rotary_store_kvcache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`rotary_embedding` of ``q``/``k``, then :func:`store_kvcache` of the rotated ``k``
    and ``v``; returns the rotated ``q`` (arguments as in those two ops).

    Padding tokens (negative slots) still get ``q`` rotated; nothing is stored for them.
    Kernels may rotate ``q`` in place and return it; ``k`` and ``v`` are left as they are.
    """
    q, k = rotary_embedding(positions, q, k, cos_sin_cache)
    store_kvcache(k, v, key_cache, value_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    return q


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
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_decodes: int = 0,
) -> torch.Tensor:
    """Causal attention of variable-length query chunks over their paged context.

    q: ``[T, Hq, D]``, the new tokens of ``S`` sequences packed back to back; sequence
    ``s`` owns rows ``query_start_loc[s]:query_start_loc[s+1]`` (``query_start_loc``:
    ``[S+1]`` int32). seq_lens: ``[S]`` int32, context length of each sequence *including*
    its new tokens, whose K/V must already be in the cache: the ``ql`` query rows of a
    sequence are its last ``ql`` positions. block_tables: ``[S, >= ceil(max_seq_len /
    block_size)]`` int32. Hq must be a multiple of Hk (GQA). Returns ``[T, Hq, D]``.
    fp8 caches: ``k_scale``/``v_scale`` as in the module docstring. ``out``: receives the
    result (and is returned). ``num_decodes``: a hint, not an input: the first ``num_decodes``
    sequences have one query token each, so an implementation may attend them with its
    decode kernel (the result is the same attention); the reference ignores it.
    """
    plan = plan_paged_attention(
        None, block_tables, query_start_loc, seq_lens, key_cache.shape[1], max_query_len, max_seq_len
    )
    result = _attend(q, key_cache, value_cache, plan, scale, _kv_scales(key_cache, k_scale, v_scale))
    return result if out is None else out.copy_(result)


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: one query token per sequence, at position ``seq_lens[s] - 1``.

    q: ``[S, Hq, D]``; other arguments as in :func:`paged_attention`. Returns ``[S, Hq, D]``.
    """
    num_seqs = q.shape[0]
    query_start_loc = torch.arange(num_seqs + 1, device=q.device, dtype=torch.int32)
    return paged_attention(
        q, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, 1, max_seq_len,
        k_scale=k_scale, v_scale=v_scale, out=out,
    )


def _kv_scales(
    key_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The scales attention applies: ``None`` for 16/32-bit caches, both scales for fp8."""
    if key_cache.dtype != FP8_DTYPE:
        return None
    if k_scale is None or v_scale is None:
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    return k_scale, v_scale


@dataclass(frozen=True)
class PagedAttentionPlan:
    """The index work of one step's attention, which every layer shares.

    Built once per step by :func:`plan_paged_attention`; each layer then only stores its new
    K/V, gathers its context blocks and runs SDPA (:func:`paged_attention_with_plan`).
    """

    store_slots: torch.Tensor | None  # [T'] int64 cache slots to write (None: no store)
    store_rows: torch.Tensor | None  # [T'] rows of k/v for store_slots; None: every row in order
    block_ids: torch.Tensor  # [S * nb] int64: the first nb blocks of each sequence, row by row
    num_seqs: int
    max_seq_len: int  # L: keys at or past a sequence's own length are masked
    max_query_len: int  # Qmax
    # (sequence, row) of each packed query row in the padded [S, Qmax] layout; None when every
    # sequence has Qmax rows (q is then a view of the padded layout).
    scatter: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None  # [S, 1, Qmax, L] bool (True: attend); None: no mask
    is_causal: bool  # no mask, plain causal (Qmax == L, one length): SDPA's is_causal


def plan_paged_attention(
    slot_mapping: torch.Tensor | None,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    max_query_len: int,
    max_seq_len: int,
) -> PagedAttentionPlan:
    """Build the gather blocks, query layout and mask of a step (arguments as in
    :func:`paged_attention` and :func:`store_kvcache`; ``slot_mapping`` None: nothing to store).

    Costs a host sync (the shapes depend on the lengths): fine on the CPU, not for CUDA graphs.
    """
    device = block_tables.device
    num_seqs = seq_lens.shape[0]
    num_tokens = int(query_start_loc[-1])
    seq_lens_l = seq_lens.long()
    starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - starts

    # Whole blocks (a block-level gather moves block_size rows per index); entries past a
    # sequence's own blocks are never attended to and may be stale, so read block 0 there.
    num_blocks = -(-max_seq_len // block_size)
    tables = block_tables[:, :num_blocks].long()
    used = torch.arange(num_blocks, device=device)[None, :] * block_size < seq_lens_l[:, None]
    block_ids = torch.where(used, tables, 0).reshape(-1)

    uniform_q = num_tokens == num_seqs * max_query_len  # every sequence has Qmax query rows
    scatter = None
    if not uniform_q:
        seq_idx = torch.repeat_interleave(
            torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens
        )
        scatter = (seq_idx, torch.arange(num_tokens, device=device) - starts[seq_idx])

    # Query row i of sequence s sits at position seq_len - q_len + i; it sees keys <= it.
    one_len = bool((seq_lens_l == max_seq_len).all())
    mask = None
    is_causal = uniform_q and one_len and max_query_len == max_seq_len and max_query_len > 1
    if not is_causal and not (uniform_q and one_len and max_query_len == 1):
        kpos = torch.arange(max_seq_len, device=device)
        qpos = (seq_lens_l - q_lens)[:, None] + torch.arange(max_query_len, device=device)[None, :]
        mask = kpos[None, None, :] <= qpos[:, :, None]  # [S, Qmax, L]
        mask &= kpos[None, None, :] < seq_lens_l[:, None, None]
        mask = mask[:, None]

    store_slots = store_rows = None
    if slot_mapping is not None:
        valid = slot_mapping >= 0
        store_slots = slot_mapping
        if not bool(valid.all()):
            store_rows = valid.nonzero().squeeze(1)
            store_slots = slot_mapping[store_rows]
    return PagedAttentionPlan(
        store_slots=store_slots,
        store_rows=store_rows,
        block_ids=block_ids,
        num_seqs=num_seqs,
        max_seq_len=max_seq_len,
        max_query_len=max_query_len,
        scatter=scatter,
        mask=mask,
        is_causal=is_causal,
    )


def paged_attention_with_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: PagedAttentionPlan,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`store_kvcache` of ``k``/``v`` then :func:`paged_attention` of ``q``, with the
    step's index work already done by :func:`plan_paged_attention`. Returns ``[T, Hq, D]``."""
    kv_scales = _kv_scales(key_cache, k_scale, v_scale)
    if plan.store_slots is not None:
        if plan.store_rows is not None:
            k, v = k.index_select(0, plan.store_rows), v.index_select(0, plan.store_rows)
        _write_slots(key_cache, plan.store_slots, k, k_scale)
        _write_slots(value_cache, plan.store_slots, v, v_scale)
    return _attend(q, key_cache, value_cache, plan, scale, kv_scales)


def _attend(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: PagedAttentionPlan,
    scale: float,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, ctx_len, q_len = plan.num_seqs, plan.max_seq_len, plan.max_query_len
    num_kv_heads = key_cache.shape[2]

    def context(cache: torch.Tensor, cache_scale: torch.Tensor | None) -> torch.Tensor:  # [S, Hk, L, D] fp32
        blocks = cache.index_select(0, plan.block_ids)
        ctx = blocks.view(num_seqs, -1, num_kv_heads, head_dim)[:, :ctx_len].transpose(1, 2)
        return from_cache(ctx, cache_scale)

    qf = q if q.dtype == torch.float32 else q.float()
    if plan.scatter is None:
        qp = qf.view(num_seqs, q_len, num_heads, head_dim)
    else:
        qp = qf.new_zeros(num_seqs, q_len, num_heads, head_dim)
        qp[plan.scatter] = qf
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        context(key_cache, None if kv_scales is None else kv_scales[0]),
        context(value_cache, None if kv_scales is None else kv_scales[1]),
        attn_mask=plan.mask,
        is_causal=plan.is_causal,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)  # [S, Qmax, Hq, D]
    out = out.reshape(num_tokens, num_heads, head_dim) if plan.scatter is None else out[plan.scatter]
    return out if out.dtype == q.dtype else out.to(q.dtype)


# Multi-LoRA (kernels.triton_ops.lora): a layer's adapters stacked in slots, a ``[S, R, K]``,
# b ``[S, N, R]``, scales ``[S]``, and one slot per token. Slot 0 is "no adapter": its a and b
# are zeros and its scale 0. Both ops skip such tokens (as the kernels may, without loads): a
# slot-0 token's shrink row is exactly zero and a token whose scale is 0 keeps its y bit for bit
# (even a -0.0, which y + 0.0 would turn into +0.0). One product per slot over every token, then
# each token keeps its own slot's row: plain, and no host sync (a CUDA graph can capture it).


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, K]`` times its tokens' adapters ``a`` ``[S, R, K]`` (``x``'s dtype): float32
    ``[T, R]`` whose row ``t`` is ``x[t].float() @ a[slots[t]].float().T``; ``slots`` ``[T]``
    int32/int64 in ``[0, S)``. Rows of slot 0 are zeros."""
    xf = x.float()
    out = xf.new_zeros(x.shape[0], a.shape[1])
    for s in range(1, a.shape[0]):
        out = torch.where((slots == s)[:, None], xf @ a[s].float().T, out)
    return out


def lora_expand(
    y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """In place on ``y`` ``[T, N]`` (returned): ``y[t] = (y[t].float() + scales[slots[t]] *
    (xa[t] @ b[slots[t]].float().T)).to(y.dtype)`` for ``xa`` float32 ``[T, R]`` (a
    :func:`lora_shrink`), ``b`` ``[S, N, R]`` of ``y``'s dtype, float32 ``scales`` ``[S]``. Tokens
    whose scale is 0 keep their row of ``y`` as it is."""
    delta = xa.new_zeros(y.shape)
    for s in range(1, b.shape[0]):
        delta = torch.where((slots == s)[:, None], xa @ b[s].float().T, delta)
    token_scales = scales.index_select(0, slots)[:, None]
    updated = (y.float() + token_scales * delta).to(y.dtype)
    return y.copy_(torch.where(token_scales != 0, updated, y))


# Mixture of experts (kernels.triton_ops.moe): a layer's experts stacked, w13 ``[E, 2I, H]``
# (each expert's gate rows, then its up rows) and w2 ``[E, H, I]``, and each token's top-k
# experts with their routing weights.


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, H]``: for each token ``t``, ``sum_k topk_weights[t, k] * down_e(silu(gate_e(x[t])) *
    up_e(x[t]))`` with ``e = topk_ids[t, k]`` (float32 ``topk_weights`` ``[T, K]``, int
    ``topk_ids`` ``[T, K]`` in ``[0, E)``), in ``x``'s dtype. Expert by expert, as HF transformers
    computes it (its per-expert products, its order of sums): a float32 model matches HF's.

    FP8 experts (W8A16): ``w13`` / ``w2`` e4m3 with float32 per-row scales ``w13_scale``
    ``[E, 2I]`` and ``w2_scale`` ``[E, H]``; each product is the activation (rounded to ``x``'s
    dtype, as the kernel feeds it) times the e4m3 codes, exact, summed in float32, times the row's
    scale: what the kernel computes but for the order of the sums."""
    if w13_scale is not None and w2_scale is not None:
        return _fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    out = torch.zeros_like(x)
    num_experts = w13.shape[0]
    mask = torch.nn.functional.one_hot(topk_ids.long(), num_classes=num_experts).permute(2, 1, 0)  # [E, K, T]
    for e in torch.nonzero(mask.sum(dim=(1, 2)) > 0).flatten().tolist():
        slot, token = torch.where(mask[e])
        gate, up = torch.nn.functional.linear(x[token], w13[e]).chunk(2, dim=-1)
        h = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])
        h = h * topk_weights[token, slot, None]
        out.index_add_(0, token, h.to(out.dtype))
    return out


def _fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == e)
        gate_up = (x[token].float() @ w13[e].float().t()) * w13_scale[e].float()
        gate, up = gate_up.chunk(2, dim=-1)
        h = (torch.nn.functional.silu(gate) * up).to(x.dtype)  # the kernel's intermediate
        y = (h.float() @ w2[e].float().t()) * w2_scale[e].float()
        out.index_add_(0, token, y * topk_weights[token, slot, None])
    return out.to(x.dtype)
