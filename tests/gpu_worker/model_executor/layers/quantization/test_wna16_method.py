"""The 4-bit linear method on GGUF tensors: parts of different types in one fused layer (Q4_K_M's
Q4_K q/k next to a Q6_K v), tensor-parallel shards (rows of a column-parallel layer, whole groups
of K of a row-parallel one), dense fallbacks; each layer computes what a 16-bit layer holding
the dequantized weights computes. Also the GGUF name map and random 4-bit weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from gpu_worker.distributed.parallel_state import TensorParallelGroup  # noqa: E402
from gpu_worker.model_executor.gguf_weights import GgufTensorSource, hf_name  # noqa: E402
from gpu_worker.model_executor.layers.parallel import QKVParallelLinear, RowParallelLinear  # noqa: E402
from gpu_worker.model_executor.layers.quantization.wna16 import WnA16LinearMethod, layer_state  # noqa: E402
from gpu_worker.model_executor.weights import TensorSource  # noqa: E402
from kernels import reference_ops  # noqa: E402

_F16_FIELDS = {"Q4_K": [0, 2], "Q6_K": [208], "Q8_0": [0], "Q4_1": [0, 2]}
CPU = torch.device("cpu")


def gguf_source(qtype: str, rows: int, k: int, rng: np.random.Generator) -> GgufTensorSource:
    """A random GGUF tensor of ``qtype`` (every code, finite float16 scales)."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    data = rng.integers(0, 256, (rows, k // block * type_size), dtype=np.uint8)
    blocks = data.reshape(-1, type_size)
    for off in _F16_FIELDS[qtype]:
        d = (rng.standard_normal(blocks.shape[0]) * 0.02).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return GgufTensorSource("t", data, qtype, (rows, k), None)


def tp_group(rank: int, size: int) -> TensorParallelGroup:
    # Loading needs no collective: a placeholder group object is enough for size > 1.
    return TensorParallelGroup(rank, size, group=object() if size > 1 else None, ranks=tuple(range(size)))


def method() -> WnA16LinearMethod:
    return WnA16LinearMethod(reference_ops(), CPU)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_qkv_with_mixed_types(tp: int) -> None:
    rng = np.random.default_rng(tp)
    hidden, head_dim, heads, kv_heads = 256, 32, 4, 2
    sources = [
        gguf_source("Q4_K", heads * head_dim, hidden, rng),
        gguf_source("Q4_K", kv_heads * head_dim, hidden, rng),
        gguf_source("Q6_K", kv_heads * head_dim, hidden, rng),
    ]
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(tp))
    for rank in range(tp):
        layer = QKVParallelLinear(
            hidden,
            head_dim,
            heads,
            kv_heads,
            bias=False,
            dtype=torch.float32,
            tp=tp_group(rank, tp),
            method=method(),
        )
        dense = []
        for shard, source in enumerate(sources):
            layer.load("weight", source, shard)
            dst, src, rows = layer.shard_rows(shard)
            dense.append(source.narrow(0, src, rows))
        layer.linear_method.process_weights_after_loading(layer)
        segments = layer_state(layer).segments
        assert [s.weight.bits for s in segments] == [4, 8]  # q+k joined (Q4_K), v alone (Q6_K)
        got = layer(x)
        torch.testing.assert_close(got, x @ torch.cat(dense).t(), rtol=1e-5, atol=1e-5)


def test_row_parallel_cuts_whole_groups_and_dense_fallback() -> None:
    rng = np.random.default_rng(7)
    n, k = 64, 512
    packed, dense_f16 = (
        gguf_source("Q4_1", n, k, rng),
        torch.randn(n, k, generator=torch.Generator().manual_seed(7)),
    )
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(8))
    for source, full in ((packed, packed.full()), (TensorSource.of(dense_f16), dense_f16)):
        partial = []
        for rank in range(2):
            layer = RowParallelLinear(
                k, n, bias=False, dtype=torch.float32, tp=tp_group(rank, 2), method=method()
            )
            layer.load("weight", source, 0)
            layer.linear_method.process_weights_after_loading(layer)
            partial.append(layer.matmul(x[:, rank * k // 2 : (rank + 1) * k // 2], None))
        torch.testing.assert_close(partial[0] + partial[1], x @ full.t(), rtol=1e-5, atol=1e-5)


def test_missing_part_is_reported() -> None:
    rng = np.random.default_rng(3)
    layer = QKVParallelLinear(
        256, 32, 4, 2, bias=False, dtype=torch.float32, tp=tp_group(0, 1), method=method()
    )
    layer.load("weight", gguf_source("Q4_K", 128, 256, rng), 0)
    with pytest.raises(ValueError, match="missing"):
        layer.linear_method.process_weights_after_loading(layer)


def test_random_4bit_weights() -> None:
    layer = RowParallelLinear(1024, 256, bias=False, dtype=torch.float32, tp=tp_group(0, 1), method=method())
    assert layer.linear_method.fill_random(layer, seed=1, std=0.02)
    (segment,) = layer_state(layer).segments
    w = segment.weight
    assert (w.bits, w.group_size, w.offsets) == (4, 128, None) and w.qweight.dtype == torch.uint8
    from kernels.quant_reference import dequantize_wna16

    std = float(dequantize_wna16(w.qweight, w.scales, None, 4, 128).std())
    assert 0.017 < std < 0.023
    assert sum(p.numel() * p.element_size() for p in layer.parameters()) == 256 * 512 + 256 * 8 * 2


def test_gguf_names() -> None:
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("blk.1.attn_k.bias") == "model.layers.1.self_attn.k_proj.bias"
    assert hf_name("blk.2.attn_k_norm.weight") == "model.layers.2.self_attn.k_norm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_split_counts_reach_only_a_set_that_takes_them() -> None:
    """A set whose one-token GEMV takes split counts (``KernelOps.wna16_split_counters``) gives
    each 4-bit segment its own at load and gets them with every call; after the layer's ops are
    swapped for a set without them (as the GPU tests' reference runners do) none is passed (the
    reference op takes no ``counters``: it would raise)."""
    from dataclasses import replace

    from kernels.quant_reference import wna16_linear

    seen: list[torch.Tensor | None] = []

    def linear(*args: object, counters: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(counters)
        return wna16_linear(*args)  # type: ignore[arg-type]

    def counts(n: int, k: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(n // 8, dtype=torch.int32, device=device)

    ops = replace(reference_ops(), wna16_linear=linear, wna16_split_counters=counts)
    layer = RowParallelLinear(1024, 256, bias=False, dtype=torch.float32, tp=tp_group(0, 1),
                              method=WnA16LinearMethod(ops, CPU))
    assert layer.linear_method.fill_random(layer, seed=1, std=0.02)
    (segment,) = layer_state(layer).segments
    assert segment.counters is not None and segment.counters.shape == (256 // 8,)
    x = torch.randn(1, 1024)
    y = layer.linear_method.apply(layer, x, None)
    assert len(seen) == 1 and seen[0] is segment.counters
    layer.linear_method.ops = reference_ops()
    assert torch.equal(layer.linear_method.apply(layer, x, None), y)


def test_rotate_and_store_asks_the_fused_op_only_where_it_can_run() -> None:
    """``QKVParallelLinear.rotate_and_store``: with an op set that has the fused one-token qkv
    GEMV (``KernelOps.wna16_rope_linear``) a one-token input of a 4-bit ``[q; k; v]`` layer goes
    to it with the layer's weight and the ``RopeStore``, and what it returns is the layer's
    answer (here None: the op's own fallback, so the caller runs the GEMV, then rotary); it is not
    asked for two tokens, for an fp8 activation a norm quantized (W8A8), for a layer whose q/k/v
    are in two formats, or by a set without the op (the CPU reference). The fused kernel's bits
    are checked in the interpreter (triton_model_check.check_rope_qkv)."""
    from dataclasses import replace

    from kernels.quant_reference import Fp8Activation
    from kernels.rope_store import RopeStore

    asked: list[tuple[object, ...]] = []

    def rope_linear(*args: object) -> None:
        asked.append(args)
        return None

    heads, kv_heads, head_dim, hidden = 4, 2, 32, 256
    ops = replace(reference_ops(), wna16_rope_linear=rope_linear)
    layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=False, dtype=torch.float32,
                              tp=tp_group(0, 1), method=WnA16LinearMethod(ops, CPU))
    assert layer.linear_method.fill_random(layer, seed=2, std=0.02)
    cache = torch.zeros(2, 4, 8, kv_heads, head_dim)
    rope = RopeStore(torch.tensor([3]), torch.zeros(16, head_dim), cache[0], cache[1], torch.tensor([9]),
                     heads, kv_heads, head_dim)
    x = torch.randn(1, hidden)
    assert layer.rotate_and_store(x, rope) is None and len(asked) == 1
    (w,) = [s.weight for s in layer_state(layer).segments]
    assert asked[0][1] is w.qweight and asked[0][-1] is rope
    assert layer.rotate_and_store(torch.randn(2, hidden), rope) is None
    assert layer.rotate_and_store(Fp8Activation.of(x), rope) is None  # type: ignore[arg-type]
    assert len(asked) == 1
    layer.linear_method.ops = reference_ops()
    assert layer.rotate_and_store(x, rope) is None and len(asked) == 1
    rng = np.random.default_rng(4)
    mixed = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=False, dtype=torch.float32,
                              tp=tp_group(0, 1), method=WnA16LinearMethod(ops, CPU))
    for shard, qtype in enumerate(("Q4_K", "Q4_K", "Q6_K")):
        rows = (heads if shard == 0 else kv_heads) * head_dim
        mixed.load("weight", gguf_source(qtype, rows, hidden, rng), shard)
    mixed.linear_method.process_weights_after_loading(mixed)
    assert len(layer_state(mixed).segments) == 2
    assert mixed.rotate_and_store(x, rope) is None and len(asked) == 1
