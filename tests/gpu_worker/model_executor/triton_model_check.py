"""Tiny models of every family on the Triton op set against the torch references (CPU).

Run as ``python triton_model_check.py`` with ``TRITON_INTERPRET=1`` (triton reads it when the
kernels are defined, so ``test_model_triton_interpret.py`` runs this in a fresh subprocess);
prints one JSON object ``{check: "ok" | traceback}``: one per family, and the fused gated MLP
(fp8, 4-bit and 16-bit weights) against the unfused one. The Triton set rotates and stores K/V
with its fused ``rotary_store_kvcache``; its separate rotary and store ops are replaced by
failing stubs, so a model that still called them would fail.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import torch

from gpu_worker.model_executor.layers.quantization.base import LinearMethod, UnquantizedLinearMethod
from gpu_worker.model_executor.layers.quantization.select import make_linear_methods
from gpu_worker.model_executor.layers.quantization.wna16 import layer_state
from kernels import KernelOps, reference_ops
from kernels import triton_ops as tops
from kernels.triton_ops import triton_ops
from kernels.triton_ops import wna16 as twna16
from kernels.triton_ops.gemv import GemvTiles
from tests.gpu_worker.model_executor.tiny_model_steps import STEPS, build_model, run_steps
from tests.helpers.tiny_models import FAMILIES, make_tiny_config


def _not_called(*_: object) -> NoReturn:
    raise AssertionError("the fused rotary_store_kvcache path must replace this op")


def check_family(family: str) -> None:
    """float32 logits of a prefill and two decode steps: Triton (interpreted) vs reference."""
    cfg = make_tiny_config(family)
    want = run_steps(build_model(cfg, reference_ops()), cfg, STEPS)
    ops = dataclasses.replace(triton_ops(), rotary_embedding=_not_called, store_kvcache=_not_called)
    got = run_steps(build_model(cfg, ops), cfg, STEPS)
    # Same float32 math in another order (attention tiles, online softmax): logits up to ~8
    # agree to ~1e-5 after two layers; 1e-4 leaves a margin, a wrong K/V row costs far more.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# One sequence: a prefill, then two one-token decode steps (the fused gated MLP's case).
ONE_SEQUENCE = [([5], [5]), ([6], [1]), ([7], [1])]
GATED = {"gated_mlp_fp8": "fp8", "gated_mlp_w4": "gptq", "gated_mlp_16bit": "none"}  # name -> quantization


def _counted(fn: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


def _linear_methods(quantization: str, cfg: Any, ops: KernelOps) -> Callable[[str], LinearMethod]:
    if quantization == "none":  # as the GPU builds it ([out, in], not the CPU's transposed layout)
        plain = UnquantizedLinearMethod.for_ops(ops, torch.device("cuda"))
        return lambda prefix: plain
    return make_linear_methods(quantization, cfg, torch.device("cpu"), ops)


_COARSE_TILES = GemvTiles(block_n=512, block_k=64, num_warps=4, split_k=1)


def check_gated_mlp(quantization: str) -> None:
    """A tiny llama on the Triton set: the one-token decode steps take the fused SiLU-and-mul
    GEMV (``LinearMethod.apply_gated``; counted) and give the logits of the same model with the
    fused op removed (GEMV, then ``silu_and_mul``): bit for bit for fp8 and 4-bit weights (the
    same sums), within float32 rounding for 16-bit ones (``gemv16`` against ``F.linear``). With
    16-bit weights the other one-token linears (qkv, o, down, the LM head) run ``gemv16_linear``
    (``KernelOps.linear16``; counted) in the fused model and ``F.linear`` in the other."""
    cfg = make_tiny_config("llama")
    calls: list[int] = []
    one_token: list[int] = []
    fused = dataclasses.replace(
        triton_ops(),
        fp8_weight_only_gated_linear=_counted(tops.fp8_weight_only_gated_linear, calls),
        wna16_gated_linear=_counted(tops.wna16_gated_linear, calls),
        linear16_gated=_counted(tops.gemv16_gated_linear, calls),
        # Coarse tiles: the interpreter runs programs one at a time, and the op's own tiling (one
        # row per program) would be 49,152 of them for the LM head; quant_kernel_checks checks it.
        linear16=_counted(functools.partial(tops.gemv16_linear, tiles=_COARSE_TILES), one_token),
        # qkv as a plain one-token linear here (its rotary epilogue: check_rope_qkv)
        linear16_rope=None, fp8_weight_only_rope_linear=None, wna16_rope_linear=None,
    )
    unfused = dataclasses.replace(fused, fp8_weight_only_gated_linear=None, wna16_gated_linear=None,
                                  linear16_gated=None, linear16=None)
    logits = []
    for ops in (fused, unfused):
        model = build_model(cfg, ops, linear=_linear_methods(quantization, cfg, ops))
        logits.append(run_steps(model, cfg, ONE_SEQUENCE))
    assert len(calls) == 2 * cfg.num_hidden_layers, f"fused gated GEMV calls: {len(calls)}"
    # Two one-token steps: qkv, o and down per layer, and the LM head (16-bit weights only).
    want_one_token = 2 * (3 * cfg.num_hidden_layers + 1) if quantization == "none" else 0
    assert len(one_token) == want_one_token, f"one-token linear16 calls: {len(one_token)}"
    for step, (got, want) in enumerate(zip(*logits, strict=True)):
        if quantization == "none":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want), f"step {step}: max |diff| {(got - want).abs().max().item()}"


# name -> quantization of check_rope_qkv's tiny llama, and the op set field of its fused qkv GEMV
ROPE = {"rope_qkv_w4": ("gptq", "wna16_rope_linear"), "rope_qkv_fp8": ("fp8", "fp8_weight_only_rope_linear"),
        "rope_qkv_16bit": ("none", "linear16_rope")}


def check_rope_qkv(quantization: str) -> None:
    """A tiny llama on the Triton set: the one-token decode steps' qkv GEMVs rotate q and k and
    store k and v in their epilogue (``KernelOps.wna16_rope_linear``, ``fp8_weight_only_rope_linear``
    or ``linear16_rope``; counted where they took the fused path: one per layer and step), and the
    logits equal those of the same model whose qkv GEMV is followed by ``rotary_store_kvcache`` (the
    set without the fused op): bit for bit for 4-bit and fp8 weights (the same GEMV tiling), within
    float32 rounding for 16-bit ones (the fused GEMV pairs rows where the plain one takes one)."""
    cfg = make_tiny_config("llama")
    field = next(f for q, f in ROPE.values() if q == quantization)
    calls: list[int] = []
    fused_op = getattr(triton_ops(), field)

    def counted(*args: Any, **kwargs: Any) -> Any:  # counts the launches that took the fused path
        q = fused_op(*args, **kwargs)
        calls.extend([] if q is None else [1])
        return q

    # Coarse one-token 16-bit tiles, as in check_gated_mlp (the interpreter runs one program at a time).
    coarse = functools.partial(tops.gemv16_linear, tiles=_COARSE_TILES)
    base = dataclasses.replace(triton_ops(), linear16=coarse)
    fused = dataclasses.replace(base, **{field: counted})
    unfused = dataclasses.replace(base, **{field: None})
    logits = []
    for ops in (fused, unfused):
        model = build_model(cfg, ops, linear=_linear_methods(quantization, cfg, ops))
        logits.append(run_steps(model, cfg, ONE_SEQUENCE))
    assert len(calls) == 2 * cfg.num_hidden_layers, f"fused qkv GEMV calls: {len(calls)}"
    for step, (got, want) in enumerate(zip(*logits, strict=True)):
        if quantization == "none":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want), f"step {step}: max |diff| {(got - want).abs().max().item()}"


class EveryShape(Mapping[tuple[int, int], GemvTiles]):
    """``wna16.M1_SHAPE_TILES`` giving ``tiles`` for every weight shape but those in ``shapes``."""

    def __init__(self, tiles: GemvTiles, shapes: Mapping[tuple[int, int], GemvTiles] | None = None) -> None:
        self.tiles = tiles
        self.shapes = dict(shapes or {})

    def __getitem__(self, key: tuple[int, int]) -> GemvTiles:
        return self.shapes.get(key, self.tiles)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(())

    def __len__(self) -> int:
        return 0


def segment_counts(model: torch.nn.Module) -> list[torch.Tensor | None]:
    """Every 4-bit segment's split counts (``Segment.counters``) in ``model``, in module order."""
    return [seg.counters for m in model.modules() if "wna16" in m.__dict__ for seg in layer_state(m).segments]


def check_split_fixup() -> None:
    """A tiny llama with 4-bit weights whose one-token GEMVs split K in two
    (``wna16.M1_SHAPE_TILES``): every 4-bit layer but gate_up holds split counts
    (``Segment.counters``), and
    the logits of a two-token prefill (the per-token GEMV twice on the same counts) and a decode
    step equal, bit for bit, those of the same model whose splits are added by a second launch
    (a set without ``wna16_split_counters``); every count is 0 afterwards. The gated gate_up
    weight's own entry, an unsplit tiling, is what its gated launches take."""
    cfg = make_tiny_config("llama")
    saved, gemv = twna16.M1_SHAPE_TILES, twna16.gemv_wna16
    gate_up = (2 * cfg.intermediate_size, cfg.hidden_size)
    gated_tiles = GemvTiles(block_n=4, block_k=32, num_warps=2, split_k=1)
    twna16.M1_SHAPE_TILES = EveryShape(GemvTiles(block_n=8, block_k=32, num_warps=4, split_k=2),
                                       {gate_up: gated_tiles})
    gated_launches: list[object] = []

    def recording_gemv(*args: Any, **kwargs: Any) -> Any:  # the real GEMV, its gated tiles noted
        gated_launches.extend([kwargs["tiles"]] if kwargs.get("gated") else [])
        return gemv(*args, **kwargs)

    twna16.gemv_wna16 = recording_gemv
    try:
        cpu = torch.device("cpu")
        with_counts: list[int] = []

        def linear(*args: Any, **kwargs: Any) -> Any:
            with_counts.extend([1] if kwargs.get("counters") is not None else [])
            return tops.wna16_linear(*args, **kwargs)

        fixup = dataclasses.replace(triton_ops(), wna16_linear=linear)
        models = [build_model(cfg, ops, linear=make_linear_methods("gptq", cfg, cpu, ops))
                  for ops in (fixup, dataclasses.replace(triton_ops(), wna16_split_counters=None))]
        counters = [segment_counts(model) for model in models]
        # Every 4-bit segment holds counts but gate_up's (one per layer), whose entry is unsplit.
        unsplit = sum(c is None for c in counters[0])
        assert unsplit == cfg.num_hidden_layers and len(counters[0]) > unsplit, counters[0]
        assert all(c is None for c in counters[1]), counters[1]
        steps = [([2], [2]), ([3], [1])]
        got, want = (run_steps(m, cfg, steps) for m in models)
        for step, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(a, b), f"step {step}: max |diff| {(a - b).abs().max().item()}"
        assert not any(c.any() for c in counters[0] if c is not None), "counts left after the steps"
        # qkv, o and down per layer take their counts at every step (gate_up: unsplit, none).
        assert len(with_counts) >= 3 * 2 * cfg.num_hidden_layers, len(with_counts)
        assert gated_launches and all(t == gated_tiles for t in gated_launches), gated_launches
    finally:
        twna16.M1_SHAPE_TILES, twna16.gemv_wna16 = saved, gemv


def run_all(names: list[str] | None = None) -> dict[str, str]:
    """Run the checks ``names`` (families and ``GATED`` names; default: all); ``{name: "ok" | traceback}``."""
    results: dict[str, str] = {}
    checks: dict[str, Callable[[], None]] = {f: functools.partial(check_family, f) for f in FAMILIES}
    checks |= {name: functools.partial(check_gated_mlp, q) for name, q in GATED.items()}
    checks["split_fixup_w4"] = check_split_fixup
    checks |= {name: functools.partial(check_rope_qkv, q) for name, (q, _) in ROPE.items()}
    for name in names or list(checks):
        check = checks[name]
        try:
            check()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test, per check
            results[name] = traceback.format_exc()
    return results


if __name__ == "__main__":
    # python triton_model_check.py [CHECK ...] (default: every family and gated check)
    torch.set_num_threads(1)
    print(json.dumps(run_all(sys.argv[1:] or None)))
