"""GGUF -> WnA16: our dequantization of the repacked weight equals ``gguf.quants.dequantize``, bit
for bit, on synthetic blocks of every supported type and on the real SmolLM2 GGUF tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from gpu_worker.model_executor.layers.quantization import gguf_format  # noqa: E402
from kernels.quant_reference import dequantize_wna16  # noqa: E402

# Byte offsets of the float16 fields (d, dmin) of each block type: random bytes there could
# be NaN/inf, so the synthetic blocks get finite values in them.
_F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def _ours(w: object) -> np.ndarray:
    return dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size).numpy()  # type: ignore[attr-defined]


def _random_blocks(name: str, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every field (all codes, all scale bits), finite float16 scales."""
    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    data = rng.integers(0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8)
    blocks = data.reshape(-1, type_size)
    for off in _F16_FIELDS[name]:
        d = (rng.standard_normal(blocks.shape[0]) * 0.05).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return data


def test_every_supported_type_is_listed_with_its_float16_fields() -> None:
    assert set(_F16_FIELDS) == gguf_format.WNA16_TYPES


@pytest.mark.parametrize("name", sorted(gguf_format.WNA16_TYPES))
def test_synthetic_blocks_dequantize_exactly(name: str) -> None:
    rng = np.random.default_rng(sorted(gguf_format.WNA16_TYPES).index(name))
    data = _random_blocks(name, rows=6, blocks_per_row=3, rng=rng)
    w = gguf_format.gguf_to_wna16(data, GGMLQuantizationType[name])
    ref = dequantize(data, GGMLQuantizationType[name])
    assert w.out_features == 6 and w.in_features == ref.shape[1]
    assert np.array_equal(_ours(w), ref)
    # float16 scales exactly where the file's scales are float16 themselves (legacy types).
    legacy = not name.endswith("_K")
    assert (w.scales.dtype == torch.float16) == legacy


def test_quantized_by_gguf_round_trip() -> None:
    """Weights quantized by the gguf package itself (the types it can quantize)."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((8, 128)).astype(np.float32)
    for qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
                  GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0):
        data = gguf.quants.quantize(x, qtype)
        ours = _ours(gguf_format.gguf_to_wna16(data, qtype))
        assert np.array_equal(ours, dequantize(data, qtype)), qtype.name


def test_smollm2_gguf_tensors_dequantize_exactly(smollm2_gguf: Path) -> None:
    """SmolLM2-135M's GGUF: Q4_1 layers and a Q8_0 embedding (its only quantized types), same
    bytes as the file's blocks (Q4_1: 4-bit codes + float16 d and m per 32 = 20 bytes)."""
    reader = gguf.GGUFReader(smollm2_gguf)
    types = {t.tensor_type.name for t in reader.tensors}
    assert types - gguf_format.DENSE_TYPES <= gguf_format.WNA16_TYPES, types
    chosen = [t for t in reader.tensors if t.name.startswith("blk.0.") or t.name == "token_embd.weight"]
    chosen = [t for t in chosen if t.tensor_type.name in gguf_format.WNA16_TYPES]
    assert {t.tensor_type.name for t in chosen} == {"Q4_1", "Q8_0"}
    for t in chosen:
        w = gguf_format.gguf_to_wna16(t.data, t.tensor_type)
        assert np.array_equal(_ours(w), dequantize(t.data, t.tensor_type)), t.name
        assert w.nbytes == t.data.nbytes, t.name


def test_other_types_fall_back_to_dense() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="not exactly representable"):
        gguf_format.gguf_to_wna16(np.zeros((4, 64), np.uint8), GGMLQuantizationType.IQ4_NL)
    data = gguf.quants.quantize(x, GGMLQuantizationType.Q8_0)
    dense = gguf_format.dequantize_gguf(data, "Q8_0")
    assert torch.equal(dense, torch.from_numpy(dequantize(data, GGMLQuantizationType.Q8_0)))
    assert torch.equal(gguf_format.dequantize_gguf(x.view(np.uint8), "F32"), torch.from_numpy(x))
    half = x.astype(np.float16)
    want = torch.from_numpy(half.astype(np.float32))
    assert torch.equal(gguf_format.dequantize_gguf(half.view(np.uint8), "F16"), want)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert torch.equal(gguf_format.dequantize_gguf(bf16.view(np.uint8), "BF16"),
                       torch.from_numpy((bf16.astype(np.uint32) << 16).view(np.float32)))


def test_llama_qk_row_order_matches_transformers() -> None:
    """The same rows as transformers' GGUF loader (LlamaTensorProcessor), for Q and for K."""
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    num_heads, num_kv_heads, head_dim, k = 4, 2, 8, 16
    config = {"num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads}
    proc = utils.LlamaTensorProcessor(config=config)
    for name, heads in (("blk.0.attn_q.weight", num_heads), ("blk.0.attn_k.weight", num_kv_heads)):
        rows = heads * head_dim
        weights = np.arange(rows * k, dtype=np.float32).reshape(rows, k)
        hf = proc.process(weights, name).weights
        assert np.array_equal(weights[gguf_format.llama_qk_row_order(rows, heads).numpy()], hf), name


def test_llama_qk_row_order_undoes_the_llama_cpp_permutation() -> None:
    """llama.cpp's converter permutes rows with ``reshape(h, 2, D/2).swapaxes(1, 2)`` (per head);
    our order must give back the original rows, and moving packed rows is exact."""
    num_heads, head_dim, k = 3, 8, 32
    rows = num_heads * head_dim
    original = np.arange(rows * k, dtype=np.float32).reshape(rows, k)
    permuted = original.reshape(num_heads, 2, head_dim // 2, k).swapaxes(1, 2).reshape(rows, k)
    order = gguf_format.llama_qk_row_order(rows, num_heads)
    assert np.array_equal(permuted[order.numpy()], original)
    data = gguf.quants.quantize(permuted, GGMLQuantizationType.Q8_0)
    w = gguf_format.gguf_to_wna16(data, "Q8_0").select_rows(order)
    assert np.array_equal(_ours(w), dequantize(data, GGMLQuantizationType.Q8_0)[order.numpy()])
