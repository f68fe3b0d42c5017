"""The LM head served in a GGUF file's own type (``output.weight``), on one rank and on two.

The head takes the 4-bit method when the file is served quantized (``select.make_linear_methods``)
and reads ``output.weight`` as the file stores it: a WnA16 type repacked exactly, a dense type as
a 16/32-bit segment. Its logits equal the hidden states times the file's weight as
``gguf.quants.dequantize`` gives it. With two tensor-parallel ranks (gloo, two processes) each
rank holds its half of the vocabulary and the last rank's shorter half is padded for the gather.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from gpu_worker.distributed.parallel_state import TensorParallelGroup  # noqa: E402
from gpu_worker.model_executor.gguf_weights import GgufTensorSource  # noqa: E402
from gpu_worker.model_executor.layers.parallel import ParallelLMHead  # noqa: E402
from gpu_worker.model_executor.layers.quantization.wna16 import WnA16LinearMethod  # noqa: E402
from kernels import get_ops  # noqa: E402

CPU = torch.device("cpu")
HIDDEN = 64


def output_weight(vocab: int, qtype: str, seed: int = 0) -> tuple[GgufTensorSource, torch.Tensor]:
    """A GGUF ``output.weight`` of ``vocab`` rows in ``qtype`` and its dequantized float32 value."""
    w = np.random.default_rng(seed).standard_normal((vocab, HIDDEN)).astype(np.float32) * 0.05
    if qtype == "F16":
        data = w.astype(np.float16)
        dense = data.astype(np.float32)
    else:
        data = quantize(w, GGMLQuantizationType[qtype])
        dense = dequantize(data, GGMLQuantizationType[qtype]).reshape(vocab, HIDDEN)
    return GgufTensorSource("output.weight", data, qtype, (vocab, HIDDEN), None), torch.from_numpy(dense)


def quantized_head(vocab: int, tp: TensorParallelGroup, source: GgufTensorSource) -> ParallelLMHead:
    method = WnA16LinearMethod(get_ops(CPU), CPU)
    head = ParallelLMHead(vocab, HIDDEN, dtype=torch.float32, tp=tp, method=method)
    assert head.quantized and "weight" not in dict(head.named_parameters())
    head.load("weight", source)
    head.linear_method.process_weights_after_loading(head)
    return head


@pytest.mark.parametrize(("qtype", "packed"), [("Q4_0", True), ("Q8_0", True), ("F16", False)])
def test_gguf_head_is_served_in_the_files_type(qtype: str, packed: bool) -> None:
    source, dense = output_weight(96, qtype)
    head = quantized_head(96, TensorParallelGroup(), source)
    (segment,) = head.wna16.segments
    assert (segment.weight is not None) == packed
    hidden = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    logits = head.compute_logits(hidden)
    assert logits is not None and logits.shape == (3, 96)
    torch.testing.assert_close(logits, hidden @ dense.t(), rtol=1e-5, atol=1e-5)


def _rank(rank: int, init_file: str, vocab: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tp = TensorParallelGroup(rank, 2, torch.distributed.group.WORLD, (0, 1))
        source, _ = output_weight(vocab, "Q8_0")
        head = quantized_head(vocab, tp, source)
        hidden = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(1))
        logits = head.compute_logits(hidden)
        if rank == 0:
            assert logits is not None
            torch.save(logits, out)
        else:
            assert logits is None
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_split_the_vocabulary_and_gather_the_logits(tmp_path: Path) -> None:
    vocab = 99  # ranks of 50 and 49 rows: the last one's logits are padded for the gather
    out = tmp_path / "logits.pt"
    mp.spawn(_rank, args=(str(tmp_path / "init"), vocab, str(out)), nprocs=2, join=True)
    source, dense = output_weight(vocab, "Q8_0")
    hidden = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(1))
    logits = torch.load(out)
    assert logits.shape == (2, vocab)
    torch.testing.assert_close(logits, hidden @ dense.t(), rtol=1e-5, atol=1e-5)


def test_a_gguf_models_output_weight_reaches_its_quantized_head() -> None:
    """A whole tiny Llama loaded from GGUF sources through ``load_weights`` (the names
    ``iter_gguf`` gives): ``lm_head.weight`` (the file's ``output.weight``) lands in the head's
    4-bit method, packed, and its logits are the file's weight's; a projection is packed too."""
    from transformers import AutoModelForCausalLM

    from gpu_worker.model_executor.layers.quantization.select import make_linear_methods
    from gpu_worker.model_executor.loader import build_model
    from kernels.quant_reference import dequantize_wna16
    from tests.helpers.tiny_models import make_tiny_config

    config = make_tiny_config("llama")
    config.architectures = ["LlamaForCausalLM"]
    assert not config.tie_word_embeddings
    ops = get_ops(CPU)
    linear = make_linear_methods("gguf", config, CPU, ops)
    model = build_model(config, CPU, torch.float32, linear=linear, ops=ops)
    hf_model = AutoModelForCausalLM.from_config(config)
    hf_shapes = {name: tuple(t.shape) for name, t in hf_model.state_dict().items()}
    rng = np.random.default_rng(3)
    dense: dict[str, torch.Tensor] = {}
    sources = []
    for name, shape in hf_shapes.items():
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 2 and name != "model.embed_tokens.weight":
            data = quantize(w, GGMLQuantizationType.Q8_0)
            dense[name] = torch.from_numpy(dequantize(data, GGMLQuantizationType.Q8_0).reshape(shape))
            sources.append((name, GgufTensorSource(name, data, "Q8_0", shape, None)))
        else:
            sources.append((name, GgufTensorSource(name, w, "F32", shape, None)))
    model.load_weights(sources)
    for module in model.modules():
        if getattr(module, "linear_method", None) is not None:
            module.linear_method.process_weights_after_loading(module)
    head = model.lm_head
    assert head.quantized
    (segment,) = head.wna16.segments
    assert segment.weight is not None and segment.weight.bits == 8
    hidden = torch.randn(2, config.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(head.compute_logits(hidden), hidden @ dense["lm_head.weight"].t(),
                               rtol=1e-5, atol=1e-5)
    (down,) = model.model.layers[0].mlp.down_proj.wna16.segments
    w = down.weight
    assert torch.equal(dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size),
                       dense["model.layers.0.mlp.down_proj.weight"])
