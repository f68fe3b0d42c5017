"""bench/bench_long.py (W6 long contexts): the floor arithmetic against a hand computation, the
Llama 3.1 rope scaling of the configs it writes, and its whole plumbing on the CPU (``--smoke``:
tiny random model, tiny lengths, every part through the real offline engine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # the scripts import each other so

import bench_long  # noqa: E402
from bench_long import SMOKE  # noqa: E402
from long_floors import SHAPES, SMOKE_SHAPE, Ceilings, Floors  # noqa: E402

REQUIRED = ("workload", "model_shape", "engine", "card", "run_id", "output_tok_s", "share_of_floor",
            "quantization", "kv_cache_dtype", "tensor_parallel_size", "pipeline_parallel_size")


def test_llama3_8b_floors_match_a_hand_computation() -> None:
    shape = SHAPES["llama3-8b"]
    # Per layer: q,k,v 4096 x (32 + 2 x 8) x 128 = 25,165,824; o 4096 x 4096 = 16,777,216;
    # gate, up, down 3 x 4096 x 14336 = 176,160,768. Sum 218,103,808, x 32 layers:
    assert shape.linear_params == 6_979_321_856
    assert shape.lm_head_params == 525_336_576  # 128,256 x 4096
    floors = Floors(shape, Ceilings(matmul_tflops=790.0, copy_gbps=4200.0))
    # One 32,768-token prompt: 2 x 6,979,321,856 x 32,768 + 2 x 525,336,576 (last token only)
    # = 457,397,887,827,968; attention 32 x 2 x 2 x 4096 x (32,768 x 32,769 / 2) = 281,483,566,645,248.
    assert floors.prompt_flops(32768) == pytest.approx(457_397_887_827_968 + 281_483_566_645_248, rel=1e-12)
    # Eight of them at 790 TFLOP/s: 5.911e15 / 7.9e14 = 7.482 s, i.e. 35,035 prompt tokens/s.
    assert floors.prefill_s([32768] * 8) == pytest.approx(7.48234, rel=1e-5)
    assert 8 * 32768 / floors.prefill_s([32768] * 8) == pytest.approx(35035.0, rel=1e-4)
    # A decode step reads the weights, (6,979,321,856 + 525,336,576 + 65 x 4096 norms) x 2 bytes =
    # 15,009,849,344, and 128 KiB of K/V per context token (2 x 32 x 8 x 128 x 2 bytes).
    assert shape.weight_bytes_per_step() == 15_009_849_344
    assert shape.kv_bytes_per_token() == 131_072
    # The first decode step of the batch: 8 contexts of 32,769 tokens, at 4.2 TB/s: 11.755 ms.
    assert floors.decode_step_s([32769] * 8) == pytest.approx(0.0117549, rel=1e-5)
    # Tokens 1 .. 255 of 8 requests in lockstep: (255 x W + 8 x 128 KiB x (255 x 32,768 +
    # 255 x 256 / 2)) / 4.2e12 = 3.0056 s.
    assert floors.lockstep_decode_s([32768] * 8, 256) == pytest.approx(3.00559, rel=1e-5)
    assert floors.run_s([32768] * 8, 256) == pytest.approx(7.48234 + 3.00559, rel=1e-5)


def test_llama3_1b_131k_prefill_floor() -> None:
    shape = SHAPES["llama3-1b"]
    # Per layer 2048 x 48 x 64 + 2048 x 2048 + 3 x 2048 x 8192 = 60,817,408; x 16 layers.
    assert shape.linear_params == 973_078_528
    floors = Floors(shape, Ceilings())
    # 2 x 973,078,528 x 131,072 + 2 x 128,256 x 2048 + 16 x 4 x 2048 x 131,072 x 131,073 / 2:
    # attention is 82% of the 1.381e15 FLOPs; 1.748 s at 790 TFLOP/s (74,980 prompt tokens/s).
    assert floors.prefill_s([131072]) == pytest.approx(1_380_995_719_757_824 / 790e12, rel=1e-12)
    assert 131072 / floors.prefill_s([131072]) == pytest.approx(74980, rel=1e-4)


def test_configs_carry_llama31_rope_scaling(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from gpu_worker.model_executor.layers.rotary import rope_inv_freq, rope_type

    folder = bench_long.write_config("llama3-8b", SHAPES["llama3-8b"], tmp_path, 131072)
    config = AutoConfig.from_pretrained(folder)
    assert rope_type(config) == "llama3" and config.max_position_embeddings == 131072
    scaled, _ = rope_inv_freq(config, 128)
    # High frequencies (wavelength under 8192 / 4 positions) are kept, the lowest divided by 8.
    base = 1.0 / 500000.0 ** (2 * 63 / 128)
    assert float(scaled[0]) == 1.0 and float(scaled[-1]) == pytest.approx(base / 8, rel=1e-5)


def test_smoke_run_writes_every_part_with_its_floors(tmp_path: Path) -> None:
    results, report = tmp_path / "results.jsonl", tmp_path / "long.md"
    bench_long.main(["--smoke", "--commit", "abc", "--out-dir", str(tmp_path), "--results", str(results),
                     "--markdown", str(report)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["workload"] for r in rows] == ["W6-32k"] + ["W6-itl"] * len(SMOKE.itl_budgets) + ["W6-131k"]
    for row in rows:
        assert all(key in row for key in REQUIRED), row
        assert (row["engine"], row["card"], row["quantization"], row["kv_cache_dtype"]) == (
            "llmserve_offline", "cpu (smoke)", "none", "auto")
        assert (row["tensor_parallel_size"], row["pipeline_parallel_size"]) == (1, 1)
        assert row["output_tok_s"] > 0
    assert len({r["run_id"] for r in rows}) == 1
    floors = Floors(SMOKE_SHAPE, Ceilings())
    for row, n, length, out in ((rows[0], SMOKE.requests, SMOKE.prompt, SMOKE.output),
                                (rows[-1], 1, SMOKE.huge_prompt, SMOKE.huge_output)):
        assert (row["requests"], row["prompt_tokens"], row["output_tokens"]) == (n, length, out)
        assert row["output_tok_s"] == pytest.approx(n * out / row["elapsed_s"], rel=0.02)
        assert row["floor_s"] == pytest.approx(floors.run_s([length] * n, out), abs=1e-3)
        assert row["prefill_tok_s"] == pytest.approx(n * length / row["prefill_s"], rel=0.02)
        prefill_floor_tok_s = n * length / floors.prefill_s([length] * n)
        assert row["prefill_floor_tok_s"] == pytest.approx(prefill_floor_tok_s, rel=1e-6)
        # The request prefilled last decodes all its other tokens after every first token.
        assert out - 1 <= row["decode_tokens"] <= n * (out - 1)
        assert row["decode_tok_s"] > 0 and row["decode_floor_tok_s"] > row["decode_tok_s"]
    assert rows[-1]["max_model_len"] == SMOKE.huge_prompt + SMOKE.huge_output
    for row, budget in zip(rows[1:-1], SMOKE.itl_budgets, strict=True):
        assert row["share_of_floor"] is None and row["max_num_batched_tokens"] == budget
        assert row["itl_samples_alone"] > 0 and row["itl_samples_during"] > 0
        ratio = row["itl_p99_ms_during_prefill"] / row["itl_p50_ms_alone"]
        assert row["p99_during_over_p50_alone"] == pytest.approx(ratio, rel=0.01)
        assert row["target_met"] == (row["p99_during_over_p50_alone"] <= 3.0)
    table = [line for line in report.read_text().splitlines() if line.startswith("| W6")]
    assert len(table) == len(rows)


def test_unknown_parts_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench_long.parse_args(["--parts", "w6_8b,w7"])


def test_prefill_split_kv_flag_binds_the_config_on_every_attention_layer() -> None:
    pytest.importorskip("triton")
    import torch

    from gpu_worker.model_executor.layers.attention import PagedAttention
    from kernels import reference_ops
    from kernels import triton_ops as tops

    def model(ops: object) -> torch.nn.Module:
        return torch.nn.ModuleList([PagedAttention(8, 2, 64, 0.125, ops) for _ in range(3)])  # type: ignore[arg-type]

    triton_model = model(tops.triton_ops())
    assert bench_long.set_prefill_split_kv(triton_model, "default") == 0
    for mode, split in (("off", False), ("on", True)):
        assert bench_long.set_prefill_split_kv(triton_model, mode) == 3
        for layer in triton_model:
            bound = layer.ops.paged_attention
            assert bound.func is tops.paged_attention and bound.keywords["config"].split_kv is split
            assert layer.ops.paged_decode_attention is tops.paged_decode_attention  # the rest untouched
    with pytest.raises(ValueError, match="triton op set"):
        bench_long.set_prefill_split_kv(model(reference_ops()), "on")
    with pytest.raises(ValueError, match="default, on or off"):
        bench_long.set_prefill_split_kv(triton_model, "maybe")


def test_prefill_split_kv_is_refused_on_the_cpu_smoke() -> None:
    assert bench_long.parse_args(["--prefill-split-kv", "off"]).prefill_split_kv == "off"
    with pytest.raises(SystemExit):
        bench_long.parse_args(["--smoke", "--prefill-split-kv", "on"])
