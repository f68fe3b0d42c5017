"""The w4_split sweep's per-shape table (bench_gemv.w4_split_table) and its use by the engine
bench (bench_gpu_quant.use_w4_tiles -> wna16.M1_SHAPE_TILES -> wna16.m1_tiles / m1_counters)."""

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

from kernels.triton_ops import wna16  # noqa: E402
from kernels.triton_ops.gemv import GemvTiles  # noqa: E402


def _row(shape: str, variant: str, us: float) -> dict[str, object]:
    return {"format": "w4_split", "shape": shape, "variant": variant, "us_per_layer": us}


def test_the_table_takes_the_fastest_unsplit_or_fixup_tiling_where_it_is_not_the_default() -> None:
    rows = [
        _row("qkv", "8,2048,4,1", 6.5), _row("qkv", "8,2048,4,2", 4.0), _row("qkv", "8,2048,4,2,fixup", 4.4),
        _row("o", "8,2048,4,1", 5.2), _row("o", "4,2048,4,1", 5.4),
        _row("down", "8,2048,4,1", 12.4), _row("down", "8,2048,4,7,fixup", 9.9),
        _row("gate_up", "8,2048,4,1", 21.0), _row("gate_up", "4,2048,4,1", 20.0),
        {"format": "w4", "shape": "o", "variant": "4,1024,4,1", "us_per_layer": 1.0},
    ]
    # qkv: the second launch's split is not the engine's (it adds in the GEMV): its fixup wins;
    # o: the default is fastest; gate_up: gated at one token, never in the table.
    assert bench_gemv.w4_split_table(rows) == {"6144,4096": [8, 2048, 4, 2], "4096,14336": [8, 2048, 4, 7]}


def test_the_engine_bench_sets_the_tiles_the_gemv_and_its_counts_follow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wna16, "M1_SHAPE_TILES", wna16.M1_SHAPE_TILES)  # restored after the test
    path = tmp_path / "w4.json"
    path.write_text(json.dumps({"6144,4096": [8, 2048, 4, 2], "4096,4096": [4, 2048, 4, 1]}))
    text = bench_gpu_quant.use_w4_tiles(path)
    assert json.loads(text) == {"4096,4096": [4, 2048, 4, 1], "6144,4096": [8, 2048, 4, 2]}
    assert wna16.m1_tiles(6144, 4096) == GemvTiles(8, 2048, 4, 2)
    assert wna16.m1_tiles(6144, 4096, gated=True) == wna16.GEMV_M1_TILES
    assert wna16.m1_tiles(4096, 14336) == wna16.GEMV_M1_TILES
    counts = wna16.m1_counters(6144, 4096, torch.device("cpu"))
    assert counts is not None and counts.dtype == torch.int32 and counts.shape == (6144 // 8,)
    assert not counts.any()
    assert wna16.m1_counters(4096, 4096, torch.device("cpu")) is None  # one split: none
