"""The multi-LoRA ops: the references against the per-token formula of their contract, the op
sets that carry them, and the Triton kernels against the references on the CPU under
``TRITON_INTERPRET=1`` (``kernel_checks.py``'s ``lora_shrink`` / ``lora_expand``, every dtype in
one fresh subprocess with the variable set, ``tests.helpers.interpreted``). The same checks run
on the GPU at larger shapes with the other kernels' (``test_triton_ops_gpu.py``, ``big``); the
CUDA-graph capture test below is GPU-only.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference, reference_ops
from tests.helpers.interpreted import InterpretedRun, run_interpreted

_CHECKS = ("lora_shrink", "lora_expand")
# bf16 included: the checks allow for the interpreter rounding float32 -> bf16 toward zero.
_DTYPES = ("float32", "bfloat16", "float16")


def _per_token_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    rows = [x[t].float() @ a[s].float().T for t, s in enumerate(slots.tolist())]
    return torch.stack(rows) if rows else torch.zeros(0, a.shape[1])


def _lora_case(tokens: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random adapters in 3 slots (slot 0 zeros with scale 0), the first token on slot 0."""
    gen = torch.Generator().manual_seed(seed)
    k, n, rank, num_slots = 40, 24, 8, 3
    a = torch.randn(num_slots, rank, k, generator=gen).to(dtype)
    b = torch.randn(num_slots, n, rank, generator=gen).to(dtype)
    a[0], b[0] = 0, 0
    slots = torch.randint(0, num_slots, (tokens,), generator=gen)
    if tokens:
        slots[0] = 0
    return {"x": torch.randn(tokens, k, generator=gen).to(dtype), "a": a, "b": b, "slots": slots,
            "y": torch.randn(tokens, n, generator=gen).to(dtype), "scales": torch.tensor([0.0, 0.5, -2.0])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [0, 1, 6])
def test_references_follow_the_per_token_formula(tokens: int, dtype: torch.dtype) -> None:
    c = _lora_case(tokens, dtype, seed=tokens)
    xa = reference.lora_shrink(c["x"], c["a"], c["slots"])
    assert xa.dtype == torch.float32 and xa.shape == (tokens, 8)
    torch.testing.assert_close(xa, _per_token_shrink(c["x"], c["a"], c["slots"]), rtol=1e-5, atol=1e-5)
    y = c["y"].clone()
    got = reference.lora_expand(y, xa, c["b"], c["slots"], c["scales"])
    assert got is y
    for t, s in enumerate(c["slots"].tolist()):
        row = (c["y"][t].float() + c["scales"][s] * (xa[t] @ c["b"][s].float().T)).to(dtype)
        torch.testing.assert_close(got[t], row, rtol=1e-5, atol=1e-5)  # the same roundings, one order


def test_references_skip_tokens_without_an_adapter_bit_for_bit() -> None:
    c = _lora_case(6, torch.float32, seed=7)
    c["slots"][:] = torch.tensor([0, 1, 2, 0, 2, 1])
    c["scales"][2] = 0.0  # an adapter with weights, turned off
    xa = reference.lora_shrink(c["x"], c["a"], c["slots"])
    assert torch.equal(xa[[0, 3]], torch.zeros(2, 8)) and not xa[[0, 3]].signbit().any()
    y = c["y"].clone()
    y[:, 0] = -0.0  # y + 0.0 would make it +0.0
    before = y.clone()
    reference.lora_expand(y, xa, c["b"], c["slots"], c["scales"])
    kept = [0, 2, 3, 4]
    assert torch.equal(y[kept].view(torch.int32), before[kept].view(torch.int32))
    assert not torch.equal(y[[1, 5]], before[[1, 5]])


def test_reference_ops_carry_the_lora_references() -> None:
    ops = reference_ops()
    assert ops.lora_shrink is reference.lora_shrink
    assert ops.lora_expand is reference.lora_expand


def test_triton_ops_carry_the_lora_kernels() -> None:
    pytest.importorskip("triton")
    from kernels.triton_ops import lora, triton_ops

    for pdl in (False, True):  # not in the PDL chain: launched as they are
        ops = triton_ops(pdl=pdl)
        assert ops.lora_shrink is lora.lora_shrink
        assert ops.lora_expand is lora.lora_expand


# One interpreted run for every dtype (the checks take well under a second each; importing torch
# in a fresh process takes longer): prints {"dtype/check": "ok" | traceback}.
_RUN_ALL_DTYPES = (
    "import json, sys, torch\n"
    "from tests.kernels.kernel_checks import Target, run_all\n"
    "dtypes, checks = sys.argv[1].split(','), sys.argv[2:]\n"
    "print(json.dumps({f'{d}/{name}': result for d in dtypes\n"
    "                  for name, result in run_all(Target('cpu', getattr(torch, d)), checks).items()}))\n"
)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    """``{"dtype/check": "ok" | traceback}`` from one interpreted run."""
    pytest.importorskip("triton")
    names = tuple(f"{dtype}/{check}" for dtype in _DTYPES for check in _CHECKS)
    run = InterpretedRun(("-c", _RUN_ALL_DTYPES, ",".join(_DTYPES), *_CHECKS), names)
    return run_interpreted({"lora": run}, timeout_s=300)["lora"]


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("check", _CHECKS)
def test_lora_kernels_match_the_references_interpreted(interpreted: dict[str, str], check: str,
                                                       dtype: str) -> None:
    assert interpreted[f"{dtype}/{check}"] == "ok", interpreted[f"{dtype}/{check}"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lora_kernels_replay_in_a_cuda_graph_with_new_slots_and_scales(dtype: torch.dtype) -> None:
    """Captured once, replayed after the slots and scales change in place (as a decode step's
    inputs do): the slots and scales are read on the device, so each replay follows them."""
    pytest.importorskip("triton")
    from kernels.triton_ops import lora

    gen = torch.Generator().manual_seed(3)
    tokens, num_slots, rank, k, n = 64, 4, 16, 4096, 4096
    x = torch.randn(tokens, k, generator=gen).to("cuda", dtype)
    a = (torch.randn(num_slots, rank, k, generator=gen) * k**-0.5).to("cuda", dtype)
    b = (torch.randn(num_slots, n, rank, generator=gen) * rank**-0.5).to("cuda", dtype)
    a[0], b[0] = 0, 0
    y0 = torch.randn(tokens, n, generator=gen).to("cuda", dtype)
    slots = torch.zeros(tokens, dtype=torch.int32, device="cuda")
    scales = torch.zeros(num_slots, device="cuda")
    y = y0.clone()
    xa = torch.empty(tokens, rank, device="cuda")

    def step() -> None:
        lora.lora_shrink(x, a, slots, out=xa)
        lora.lora_expand(y, xa, b, slots, scales)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        slots.copy_(torch.randint(0, num_slots, (tokens,), generator=g))
        scales.copy_(torch.rand(num_slots, generator=g) + 0.5)
        scales[0] = 0
        y.copy_(y0)
        graph.replay()
        want = reference.lora_expand(y0.clone(), reference.lora_shrink(x, a, slots), b, slots, scales)
        torch.testing.assert_close(xa, reference.lora_shrink(x, a, slots), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y, want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=2e-2)
        none = slots == 0
        assert torch.equal(y[none], y0[none]), f"replay {seed}: a token without adapter changed"
