"""The one-token settings the GEMV sweeps choose (bench_gemv.w4_split_table, engine_settings) and
their use by the engine bench (bench_gpu_quant.use_w4_tiles -> wna16.M1_PREFETCH /
M1_SHAPE_TILES -> wna16.m1_tiles / m1_counters; gemv.LINEAR16_M1_PREFETCH / FP8_M1_PREFETCH)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_gemv  # noqa: E402
import bench_gpu_quant  # noqa: E402

from kernels.triton_ops import gemv, wna16  # noqa: E402
from kernels.triton_ops.gemv import GemvTiles  # noqa: E402


def _rows(shape: str, us: dict[str, float]) -> list[dict[str, object]]:
    return [{"format": "w4_split", "shape": shape, "variant": v, "us_per_layer": t} for v, t in us.items()]


def _sweep(prefetch_gain: float) -> list[dict[str, object]]:
    """Rows as bench_w4_split names them; ``prefetch`` takes ``prefetch_gain`` us off every row."""
    base = {
        "qkv": {"8,2048,4,1": 6.5, "8,2048,4,2": 4.0, "8,2048,4,2,fixup": 4.4},
        "o": {"8,2048,4,1": 5.2, "4,2048,4,1": 5.4},
        "down": {"8,2048,4,1": 12.4, "8,2048,4,7": 9.0, "8,2048,4,7,fixup": 9.9},
        "gate_up": {"8,2048,4,1": 21.0, "4,2048,4,1": 20.0},
    }
    rows = []
    for shape, variants in base.items():
        rows += _rows(shape, variants)
        rows += _rows(shape, {f"{v},prefetch": t - prefetch_gain for v, t in variants.items()
                              if v.endswith(",1") or v.endswith(",fixup")})
    return rows + [{"format": "w4", "shape": "o", "variant": "4,1024,4,1", "us_per_layer": 1.0}]


def test_the_table_takes_what_the_engine_can_run_fastest_and_prefetch_where_it_wins() -> None:
    # qkv: the second launch's split is not the engine's (it adds in the GEMV): its fixup wins;
    # o: the default is fastest; gate_up: gated at one token, the default tiling only.
    want = {"6144,4096": [8, 2048, 4, 2], "4096,14336": [8, 2048, 4, 7]}
    assert bench_gemv.w4_split_table(_sweep(0.0)) == {"prefetch": False, "tiles": want}
    assert bench_gemv.w4_split_table(_sweep(0.5)) == {"prefetch": True, "tiles": want}
    assert bench_gemv.w4_split_table(_sweep(-0.5)) == {"prefetch": False, "tiles": want}


def test_engine_settings_take_each_part_that_ran_and_prefetch_per_format_where_it_wins() -> None:
    dense = [{"format": f"dense_prefetch {fmt}", "shape": shape, "variant": f"prefetch={p}",
              "us_per_layer": base[shape] - (gain if p else 0.0)}
             for fmt, gain in (("bf16", -0.2), ("fp8", 0.3)) for p in (False, True)
             for base in [{"qkv": 6.0, "o": 4.0, "gate_up": 20.0, "down": 10.0}] for shape in base]
    assert bench_gemv.engine_settings(dense) == {"linear16_prefetch": False, "fp8_prefetch": True}
    both = bench_gemv.engine_settings(dense + _sweep(0.5))
    assert both["prefetch"] is True and both["fp8_prefetch"] is True and "tiles" in both
    assert bench_gemv.engine_settings([]) == {}


def test_the_engine_bench_sets_the_settings_the_gemv_and_its_counts_follow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wna16, "M1_SHAPE_TILES", wna16.M1_SHAPE_TILES)  # both restored after the test
    monkeypatch.setattr(wna16, "M1_PREFETCH", wna16.M1_PREFETCH)
    monkeypatch.setattr(gemv, "LINEAR16_M1_PREFETCH", gemv.LINEAR16_M1_PREFETCH)
    monkeypatch.setattr(gemv, "FP8_M1_PREFETCH", gemv.FP8_M1_PREFETCH)
    path = tmp_path / "w4.json"
    path.write_text(json.dumps({"prefetch": True, "fp8_prefetch": True,
                                "tiles": {"6144,4096": [8, 2048, 4, 2], "4096,4096": [4, 2048, 4, 1]}}))
    text = bench_gpu_quant.use_w4_tiles(path)
    assert json.loads(text)["tiles"] == {"4096,4096": [4, 2048, 4, 1], "6144,4096": [8, 2048, 4, 2]}
    assert wna16.M1_PREFETCH is True and gemv.FP8_M1_PREFETCH is True
    assert gemv.LINEAR16_M1_PREFETCH is False  # absent: left as it was
    assert wna16.m1_tiles(6144, 4096) == GemvTiles(8, 2048, 4, 2)
    assert wna16.m1_tiles(6144, 4096, gated=True) == wna16.GEMV_M1_TILES
    assert wna16.m1_tiles(4096, 14336) == wna16.GEMV_M1_TILES
    counts = wna16.m1_counters(6144, 4096, torch.device("cpu"))
    assert counts is not None and counts.dtype == torch.int32 and counts.shape == (6144 // 8,)
    assert not counts.any()
    assert wna16.m1_counters(4096, 4096, torch.device("cpu")) is None  # one split: none
