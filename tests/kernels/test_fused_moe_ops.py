"""The fused mixture-of-experts op: the reference against the per-token formula, the op sets that
carry it, the alignment step (:func:`kernels.triton_ops.moe.moe_align`, plain torch: run
here directly, and on the meta device to show it needs no host value), and the Triton kernels
against the reference on the CPU under ``TRITON_INTERPRET=1`` (``kernel_checks.py``'s
``fused_moe`` and ``fused_moe_fp8``, the FP8-expert path: one fresh subprocess per dtype with the
variable set, ``tests.helpers.interpreted``). The same checks run on the GPU at larger shapes with
the other kernels' (``test_triton_ops_gpu.py``, ``big``); the CUDA-graph capture test below is
GPU-only.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from kernels import reference, reference_ops
from tests.helpers.interpreted import InterpretedRun, run_interpreted

_HERE = Path(__file__).resolve().parent
# bf16: the op widens bf16 tiles to float32 off CUDA (the interpreter's tl.dot takes bf16 for
# integers), so the interpreted bf16 run checks the op's roundings, not the GPU's bf16 MMA; fp16
# runs the 16-bit tl.dot as it is.
_DTYPES = ("float32", "bfloat16", "float16")
_CHECKS = ("fused_moe", "fused_moe_fp8")


def _routing(tokens: int, num_experts: int, top_k: int, routing: str,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernel_checks.moe_routing`` (imported lazily: that module imports triton)."""
    from tests.kernels.kernel_checks import moe_routing

    return moe_routing(tokens, num_experts, top_k, routing, torch.Generator().manual_seed(seed))


def _per_token(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
    """The contract token by token, in float64."""
    inter = w13.shape[1] // 2
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros(x.shape[1], dtype=torch.float64)
        for k in range(ids.shape[1]):
            w = w13[ids[t, k]].double()
            gate, up = w[:inter] @ x[t].double(), w[inter:] @ x[t].double()
            row += weights[t, k].double() * (w2[ids[t, k]].double() @ (torch.nn.functional.silu(gate) * up))
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("routing", ["random", "some", "all"])
def test_reference_follows_the_per_token_formula(routing: str) -> None:
    gen = torch.Generator().manual_seed(1)
    tokens, hidden, inter, num_experts, top_k = 9, 16, 12, 8, 2
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5
    weights, ids = _routing(tokens, num_experts, top_k, routing, seed=2)
    got = reference.fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
    torch.testing.assert_close(got.double(), _per_token(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-6)


def _quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernel_checks.quantize_experts`` (``quantize_fp8_rows`` per expert; imported lazily)."""
    from tests.kernels.kernel_checks import quantize_experts

    return quantize_experts(w)


@pytest.mark.parametrize("routing", ["random", "some"])
def test_reference_fp8_follows_the_per_token_formula_on_dequantized_experts(routing: str) -> None:
    """The reference's fp8 path is the formula on the experts ``codes * row scale`` (float32 x:
    the intermediate's rounding to x's dtype is none), so the scales are per row as laid out."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(5)
    tokens, hidden, inter, num_experts, top_k = 9, 16, 12, 8, 2
    x = torch.randn(tokens, hidden, generator=gen)
    w13, w13_scale = _quantize_experts(torch.randn(num_experts, 2 * inter, hidden, generator=gen))
    w2, w2_scale = _quantize_experts(torch.randn(num_experts, hidden, inter, generator=gen))
    assert w13.dtype == torch.float8_e4m3fn and w13_scale.shape == (num_experts, 2 * inter)
    assert w2.dtype == torch.float8_e4m3fn and w2_scale.shape == (num_experts, hidden)
    weights, ids = _routing(tokens, num_experts, top_k, routing, seed=6)
    got = reference.fused_moe(x, w13, w2, weights, ids, w13_scale, w2_scale)
    assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
    w13_real = w13.double() * w13_scale.double()[..., None]
    w2_real = w2.double() * w2_scale.double()[..., None]
    want = _per_token(x, w13_real, w2_real, weights, ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_op_sets_carry_fused_moe() -> None:
    assert reference_ops().fused_moe is reference.fused_moe
    pytest.importorskip("triton")
    from kernels.triton_ops import fused_moe, triton_ops
    from kernels.triton_ops.moe import fused_moe as op

    assert fused_moe is op
    for pdl in (False, True):  # not in the PDL chain: launched as it is
        assert triton_ops(pdl=pdl).fused_moe is op
    # The layer passes the fp8 scales by position: the op takes them where the reference does.
    ref_params = list(inspect.signature(reference.fused_moe).parameters)
    assert list(inspect.signature(op).parameters)[:len(ref_params)] == ref_params


# (tokens, top-k, experts, block_m, routing): decode (fewer pairs than experts), one pair, groups
# that fill their blocks exactly (16 pairs of one expert), experts without pairs, one expert
# with every token, large blocks.
_ALIGN_CASES = [(1, 2, 8, 16, "random"), (1, 1, 1, 16, "random"), (3, 2, 64, 16, "random"),
                (5, 2, 4, 16, "random"), (37, 2, 8, 16, "some"), (37, 1, 4, 16, "all"),
                (37, 2, 4, 32, "all"), (16, 1, 4, 16, "all"), (64, 4, 8, 64, "random"),
                (200, 2, 16, 32, "random"), (0, 2, 4, 16, "random")]


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize(("tokens", "top_k", "num_experts", "block_m", "routing"), _ALIGN_CASES)
def test_moe_align_groups_every_pair_by_expert_in_padded_blocks(
        tokens: int, top_k: int, num_experts: int, block_m: int, routing: str,
        ids_dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from kernels.triton_ops.moe import moe_align, moe_padded_len

    _, ids = _routing(tokens, num_experts, top_k, routing, seed=tokens + num_experts)
    ids = ids.to(ids_dtype)
    pairs = tokens * top_k
    sorted_ids, block_expert = moe_align(ids, num_experts, block_m)
    # The static bound: vLLM's ceil((T*K + E*(BM-1)) / BM) * BM with E capped at the pairs.
    length = moe_padded_len(pairs, num_experts, block_m)
    assert length == -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
    assert length <= -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m
    assert sorted_ids.shape == (length,) and sorted_ids.dtype == torch.int32
    assert block_expert.shape == (length // block_m,) and block_expert.dtype == torch.int32
    real = sorted_ids[sorted_ids != pairs]
    assert (sorted_ids[sorted_ids >= pairs] == pairs).all(), "padding must be the sentinel T*K"
    assert torch.equal(real.sort().values, torch.arange(pairs, dtype=torch.int32)), "each pair exactly once"
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    used_blocks = int((-(-counts // block_m)).sum())
    for b, e in enumerate(block_expert.tolist()):
        block = sorted_ids[b * block_m:(b + 1) * block_m].long()
        mine = block[block != pairs]
        if b >= used_blocks:
            assert e == num_experts and mine.numel() == 0, f"block {b} past the groups: expert {e}, {mine}"
            continue
        assert 0 <= e < num_experts and mine.numel() > 0, f"block {b}: expert {e}, pairs {mine.tolist()}"
        assert (flat[mine] == e).all(), f"block {b} of expert {e} holds pairs of {flat[mine].tolist()}"
        # Within a block, the pairs first and in increasing order (a stable sort), then padding.
        assert torch.equal(block[: mine.numel()], mine) and (mine.diff() > 0).all(), f"block {b}"
    assert block_expert[:used_blocks].diff().ge(0).all(), "experts in increasing order"
    assert set(block_expert[:used_blocks].tolist()) == set(flat.tolist())


def test_moe_align_needs_no_host_value() -> None:
    """On the meta device (shapes, no data: ``.item()`` or a data-dependent shape would raise),
    the shapes the CPU gives: the alignment can be captured in a CUDA graph."""
    pytest.importorskip("triton")
    from kernels.triton_ops.moe import moe_align

    _, ids = _routing(37, 8, 2, "random", seed=3)
    meta = moe_align(ids.to("meta"), 8, 16)
    cpu = moe_align(ids, 8, 16)
    assert [(m.shape, m.dtype, m.device.type) for m in meta] == [(c.shape, c.dtype, "meta") for c in cpu]


def test_fused_moe_rejects_bad_operands() -> None:
    pytest.importorskip("triton")
    from kernels.triton_ops.moe import fused_moe

    x, w13, w2 = torch.randn(3, 32), torch.randn(4, 48, 32), torch.randn(4, 32, 24)
    weights, ids = torch.rand(3, 2), torch.randint(0, 4, (3, 2))
    with pytest.raises(ValueError, match="w13 must be"):
        fused_moe(x, w13[:, :, :16], w2, weights, ids)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe(x, w13, w2[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="topk_weights must be"):
        fused_moe(x, w13, w2, weights.double(), ids)
    with pytest.raises(ValueError, match="topk_ids must be"):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError, match="block_m must be"):
        fused_moe(x, w13, w2, weights, ids, block_m=24)
    with pytest.raises(ValueError, match="block_k must be"):
        fused_moe(x, w13, w2, weights, ids, block_k=8)


def test_fused_moe_rejects_bad_fp8_scales() -> None:
    """Both scales or neither; fp8 experts are e4m3 with float32 ``[E, 2I]`` / ``[E, H]`` scales."""
    pytest.importorskip("triton")
    from kernels.triton_ops.moe import fused_moe

    x, weights, ids = torch.randn(3, 32), torch.rand(3, 2), torch.randint(0, 4, (3, 2))
    w13, w13_scale = _quantize_experts(torch.randn(4, 48, 32))
    w2, w2_scale = _quantize_experts(torch.randn(4, 32, 24))
    with pytest.raises(ValueError, match="both w13_scale and w2_scale"):
        fused_moe(x, w13, w2, weights, ids, w13_scale)
    with pytest.raises(ValueError, match="both w13_scale and w2_scale"):
        fused_moe(x, w13, w2, weights, ids, w2_scale=w2_scale)
    with pytest.raises(ValueError, match="w13 must be .*float8_e4m3fn"):  # scales with 16/32-bit experts
        fused_moe(x, w13.float(), w2.float(), weights, ids, w13_scale, w2_scale)
    with pytest.raises(ValueError, match="w13 must be .*float32"):  # fp8 experts without scales
        fused_moe(x, w13, w2, weights, ids)
    with pytest.raises(ValueError, match=r"w13_scale must be float32 \[4, 48\]"):
        fused_moe(x, w13, w2, weights, ids, w13_scale[..., None], w2_scale)
    with pytest.raises(ValueError, match=r"w13_scale must be float32"):
        fused_moe(x, w13, w2, weights, ids, w13_scale.double(), w2_scale)
    with pytest.raises(ValueError, match=r"w2_scale must be float32 \[4, 32\]"):
        fused_moe(x, w13, w2, weights, ids, w13_scale, w2_scale[:, :24])


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, str]]:
    """``{dtype: {check: "ok" | traceback}}`` for the checks ``_CHECKS``: one interpreted run per
    dtype, all at once."""
    pytest.importorskip("triton")
    script = str(_HERE / "kernel_checks.py")
    runs = {dtype: InterpretedRun((script, dtype, *_CHECKS), _CHECKS) for dtype in _DTYPES}
    return run_interpreted(runs, timeout_s=300)


@pytest.mark.parametrize("dtype", _DTYPES)
def test_fused_moe_kernels_match_the_reference_interpreted(interpreted: dict[str, dict[str, str]],
                                                           dtype: str) -> None:
    assert interpreted[dtype]["fused_moe"] == "ok", interpreted[dtype]["fused_moe"]


@pytest.mark.parametrize("dtype", _DTYPES)
def test_fused_moe_fp8_experts_match_the_reference_interpreted(interpreted: dict[str, dict[str, str]],
                                                               dtype: str) -> None:
    """e4m3 experts with row scales (``kernel_checks.check_fused_moe_fp8``, its docstring gives
    the tolerances): the interpreter decodes e4m3 in integer ops (its own conversion turns the
    NaN codes into +-480), checked on all 256 codes first."""
    assert interpreted[dtype]["fused_moe_fp8"] == "ok", interpreted[dtype]["fused_moe_fp8"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_moe_replays_in_a_cuda_graph_with_new_routing(dtype: torch.dtype) -> None:
    """Captured once, replayed after the routing changes in place (as a decode step's router
    output does): the alignment and the kernels read the ids and weights on the device."""
    pytest.importorskip("triton")
    from kernels.triton_ops.moe import fused_moe

    gen = torch.Generator().manual_seed(4)
    tokens, hidden, inter, num_experts, top_k = 8, 1024, 512, 16, 4
    x = torch.randn(tokens, hidden, generator=gen).to("cuda", dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to("cuda", dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5).to("cuda", dtype)
    weights = torch.zeros(tokens, top_k, device="cuda")
    ids = torch.zeros(tokens, top_k, dtype=torch.int32, device="cuda")
    ids[:] = torch.arange(top_k, dtype=torch.int32, device="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for seed, routing in enumerate(["random", "some", "all"]):
        w, i = _routing(tokens, num_experts, top_k, routing, seed=seed)
        weights.copy_(w)
        ids.copy_(i)
        graph.replay()
        want = reference.fused_moe(x, w13, w2, weights, ids)
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(out, want, rtol=tol, atol=tol, msg=f"replay {seed} ({routing})")
