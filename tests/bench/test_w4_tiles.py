"""The one-token settings the GEMV sweep chooses (bench_gemv.w4_split_table, engine_settings) and
their use by the engine bench (bench_gpu_quant.use_w4_tiles -> wna16.M1_SHAPE_TILES ->
wna16.m1_tiles / m1_counters)."""

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


def _sweep() -> list[dict[str, object]]:
    """Rows as bench_w4_split names them, and one of another part."""
    variants = {
        "qkv": {"8,2048,4,1": 6.5, "8,2048,4,2": 4.0, "8,2048,4,2,fixup": 4.4},
        "o": {"8,2048,4,1": 5.2, "4,2048,4,1": 5.4},
        "down": {"8,2048,4,1": 12.4, "8,2048,4,7": 9.0, "8,2048,4,7,fixup": 9.9},
        "gate_up": {"8,2048,4,1": 21.0, "4,2048,4,1": 20.0},
    }
    rows: list[dict[str, object]] = [{"format": "w4_split", "shape": shape, "variant": v, "us_per_layer": t}
                                     for shape, us in variants.items() for v, t in us.items()]
    return rows + [{"format": "w4", "shape": "o", "variant": "4,1024,4,1", "us_per_layer": 1.0}]


def test_the_table_takes_what_the_engine_can_run_fastest() -> None:
    # qkv: the second launch's split is not the engine's (it adds in the GEMV): its fixup wins;
    # o: the default is fastest; gate_up (gated, timed at one split only): its fastest tiling.
    want = {"tiles": {"6144,4096": [8, 2048, 4, 2], "4096,14336": [8, 2048, 4, 7],
                      "28672,4096": [4, 2048, 4, 1]}}
    assert bench_gemv.w4_split_table(_sweep()) == want
    # A variant of a flag the engine does not run (an older sweep's prefetch) is never taken.
    old = {"format": "w4_split", "shape": "o", "variant": "4,2048,4,1,prefetch", "us_per_layer": 1.0}
    assert bench_gemv.w4_split_table([*_sweep(), old]) == want


def test_engine_settings_take_the_w4_split_part_if_it_ran() -> None:
    assert bench_gemv.engine_settings(_sweep()) == bench_gemv.w4_split_table(_sweep())
    assert bench_gemv.engine_settings([]) == {}


def test_the_engine_bench_sets_the_tiles_the_gemv_and_its_counts_follow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wna16, "M1_SHAPE_TILES", wna16.M1_SHAPE_TILES)  # restored after the test
    monkeypatch.setattr(wna16, "M1_PACKED_TILES", wna16.M1_PACKED_TILES)
    path = tmp_path / "w4.json"
    path.write_text(json.dumps({"tiles": {"6144,4096": [8, 2048, 4, 2], "4096,4096": [4, 2048, 4, 1]}}))
    text = bench_gpu_quant.use_w4_tiles(path)
    # The file is the whole table: no packed-decode entries where it names none.
    assert json.loads(text) == {"tiles": {"4096,4096": [4, 2048, 4, 1], "6144,4096": [8, 2048, 4, 2]}}
    assert text == bench_gpu_quant.one_token_settings()
    assert wna16.m1_tiles(6144, 4096, dp4a=False) == GemvTiles(8, 2048, 4, 2)
    assert wna16.m1_tiles(6144, 4096) == GemvTiles(8, 2048, 4, 2)
    assert wna16.m1_tiles(6144, 4096, gated=True) == wna16.GEMV_M1_TILES  # gated: one split only
    assert wna16.m1_tiles(4096, 4096, gated=True) == GemvTiles(4, 2048, 4, 1)
    assert wna16.m1_tiles(4096, 14336) == wna16.GEMV_M1_TILES
    counts = wna16.m1_counters(6144, 4096, torch.device("cpu"))
    assert counts is not None and counts.dtype == torch.int32 and counts.shape == (6144 // 8,)
    assert not counts.any()
    assert wna16.m1_counters(4096, 4096, torch.device("cpu")) is None  # one split: none


@pytest.mark.parametrize("key", ["prefetch", "linear16_prefetch", "fp8_prefetch", "tma"])
def test_an_older_table_with_a_removed_switch_is_refused_whole(
        key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wna16, "M1_SHAPE_TILES", wna16.M1_SHAPE_TILES)  # restored after the test
    before = wna16.M1_SHAPE_TILES
    path = tmp_path / "w4.json"
    path.write_text(json.dumps({key: False, "tiles": {"6144,4096": [8, 2048, 4, 2]}}))
    with pytest.raises(ValueError, match=rf"key\(s\) {key}:"):
        bench_gpu_quant.use_w4_tiles(path)
    assert wna16.M1_SHAPE_TILES is before  # nothing of it applied


def test_a_table_with_packed_tiles_sets_both_and_rows_record_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wna16, "M1_SHAPE_TILES", wna16.M1_SHAPE_TILES)  # restored after the test
    monkeypatch.setattr(wna16, "M1_PACKED_TILES", wna16.M1_PACKED_TILES)
    table = {"tiles": {"6144,4096": [16, 2048, 4, 1]}, "packed_tiles": {"6144,4096": [4, 2048, 4, 2]}}
    path = tmp_path / "w4.json"
    path.write_text(json.dumps(table))
    assert json.loads(bench_gpu_quant.use_w4_tiles(path)) == table
    assert wna16.m1_tiles(6144, 4096) == GemvTiles(16, 2048, 4, 1)
    assert wna16.m1_tiles(6144, 4096, dp4a=False) == GemvTiles(4, 2048, 4, 2)
    # Counts for the packed decode's split: as many as its smaller row blocks need.
    counts = wna16.m1_counters(6144, 4096, torch.device("cpu"))
    assert counts is not None and counts.shape == (6144 // 4,)
    path.write_text(json.dumps({"packed_tiles": [4, 2048, 4, 2]}))
    with pytest.raises(ValueError, match="'packed_tiles' must map"):
        bench_gpu_quant.use_w4_tiles(path)


def test_the_default_tables_give_each_decode_its_own_qkv_tiling() -> None:
    # The integer decode shares each thread's input conversion over 16 rows; the packed decodes
    # are faster at 4 (DECISIONS 160). Other shapes: one entry for both.
    assert wna16.m1_tiles(6144, 4096) == GemvTiles(16, 2048, 4, 1)
    assert wna16.m1_tiles(6144, 4096, dp4a=False) == GemvTiles(4, 2048, 4, 1)
    for n, k in ((4096, 4096), (4096, 14336), (28672, 4096)):
        assert wna16.m1_tiles(n, k) == wna16.m1_tiles(n, k, dp4a=False)
    assert json.loads(bench_gpu_quant.one_token_settings())["packed_tiles"] == {"6144,4096": [4, 2048, 4, 1]}


@pytest.mark.parametrize(("dtype", "flag"), [(torch.bfloat16, "M1_DP4A"), (torch.float16, "M1_DP4A_F16"),
                                             (torch.bfloat16, "M1_PAIRS")])
def test_the_engine_launch_takes_the_packed_tiling_where_the_integer_decode_is_off(
        dtype: torch.dtype, flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``wna16.one_token_gemv`` (the engine's one-token launch) passes ``gemv_wna16`` the tiling
    of the decode it takes: 16 qkv rows with the integer decode, 4 for asymmetric weights,
    float32 inputs, or once the dtype's integer decode (or the packed decode it needs) is off."""
    launched: list[tuple[GemvTiles, bool]] = []

    def record(*args: object, tiles: GemvTiles, dp4a: bool, **kw: object) -> torch.Tensor:
        launched.append((tiles, dp4a))
        return torch.zeros(1)

    monkeypatch.setattr(wna16, "gemv_wna16", record)
    x = torch.zeros(1, 4096, dtype=dtype)
    qw = torch.zeros(6144, 2048, dtype=torch.uint8)
    sc = torch.ones(6144, 32, dtype=dtype)
    wna16.one_token_gemv(x, qw, sc, None, 4, 128, None, pdl=False)
    wna16.one_token_gemv(x, qw, sc, torch.zeros_like(sc), 4, 128, None, pdl=False)  # asymmetric
    wna16.one_token_gemv(x.float(), qw, sc.float(), None, 4, 128, None, pdl=False)  # not 16-bit
    monkeypatch.setattr(wna16, flag, False)
    wna16.one_token_gemv(x, qw, sc, None, 4, 128, None, pdl=False)
    packed = (GemvTiles(4, 2048, 4, 1), False)
    assert launched == [(GemvTiles(16, 2048, 4, 1), True), packed, packed, packed]
