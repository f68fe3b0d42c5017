"""``tensor_parallel_size = auto``: the fewest GPUs whose memory holds the weights and a useful
KV pool, tensor parallel first (inside one node it costs least), then pipeline stages.

A KV pool is "useful" when it holds ``USEFUL_KV_SEQUENCES`` sequences of the served context
length (at most ``USEFUL_KV_TOKENS`` tokens each): enough to batch, not just to fit one request.
Weights are counted from the config (parameters x bytes per parameter); activations and CUDA
graphs get ``ACTIVATION_RESERVE`` of each device. The choice and its numbers are logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from gpu_worker.model_executor.model_config import head_dim_of, is_sparse_layer, max_context_len, moe_shape

logger = logging.getLogger(__name__)

USEFUL_KV_SEQUENCES = 4
USEFUL_KV_TOKENS = 32768
ACTIVATION_RESERVE = 0.10
_TP_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class ParallelChoice:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    reason: str


def weight_bytes(hf_config: Any, element_size: float) -> int:
    """Bytes of the model's weights in the serving dtype (embeddings and LM head included;
    ``element_size`` below 2 for quantized linear layers, an upper bound there: their embedding
    and LM head stay 16-bit)."""
    h, vocab = hf_config.hidden_size, hf_config.vocab_size
    d = head_dim_of(hf_config)
    q, kv = hf_config.num_attention_heads * d, hf_config.num_key_value_heads * d
    attention = h * (q + 2 * kv) + q * h + 2 * h
    layers = hf_config.num_hidden_layers
    params = layers * attention + sum(_mlp_params(hf_config, i) for i in range(layers))
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    params += vocab * h * (1 if tied else 2) + h
    return int(params * element_size)


def _mlp_params(hf_config: Any, index: int) -> int:
    """Parameters of layer ``index``'s MLP: dense, or a sparse one's router, experts and shared
    expert (every expert is resident)."""
    h = hf_config.hidden_size
    shape = moe_shape(hf_config)
    if shape is None or not is_sparse_layer(hf_config, index):
        return 3 * h * hf_config.intermediate_size
    shared = 3 * h * shape.shared_intermediate_size + h if shape.shared_intermediate_size else 0
    return shape.num_experts * (3 * h * shape.intermediate_size + h) + shared


def kv_bytes_per_token(hf_config: Any, element_size: int) -> int:
    layers, kv_heads = hf_config.num_hidden_layers, hf_config.num_key_value_heads
    return 2 * layers * kv_heads * head_dim_of(hf_config) * element_size


def _tp_divides(hf_config: Any, tp: int) -> bool:
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    return heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)


def choose(
    hf_config: Any, element_size: float, device_bytes: int, num_devices: int, utilization: float,
    max_model_len: int | None = None, pipeline: int = 1, kv_element_size: int | None = None,
) -> ParallelChoice:
    """The smallest TP (then PP) for which each device's share fits ``utilization`` of it;
    ``pipeline`` above 1 fixes the number of stages and only TP is chosen. ``element_size``:
    bytes per weight; ``kv_element_size``: per KV element (default the same)."""
    context = min(max_model_len or max_context_len(hf_config), USEFUL_KV_TOKENS)
    weights = weight_bytes(hf_config, element_size)
    kv_elem = int(element_size) if kv_element_size is None else kv_element_size
    kv = USEFUL_KV_SEQUENCES * context * kv_bytes_per_token(hf_config, kv_elem)
    budget = device_bytes * (utilization - ACTIVATION_RESERVE)
    gib = 2**30
    need = f"weights {weights / gib:.1f} GiB + KV for {USEFUL_KV_SEQUENCES} x {context} tokens "
    need += f"{kv / gib:.1f} GiB"
    most = min(num_devices, hf_config.num_hidden_layers)
    stages = [pipeline] if pipeline > 1 else range(1, most + 1)
    for pp in stages:
        for tp in _TP_SIZES:
            if tp * pp > num_devices or not _tp_divides(hf_config, tp):
                continue
            share = (weights + kv) / (tp * pp)
            if share <= budget:
                reason = (
                    f"{need}: {share / gib:.1f} GiB per device with TP={tp} x PP={pp}, within "
                    f"{budget / gib:.1f} GiB of each of {num_devices} devices"
                )
                return ParallelChoice(tp, pp, reason)
    raise ValueError(f"{need} does not fit {num_devices} devices of {device_bytes / 2**30:.0f} GiB")


def resolve_parallel_sizes(
    config: Any, hf_config: Any, device: Any, element_size: float, kv_element_size: int | None = None
) -> Any:
    """``config`` with ``tensor_parallel_size`` "auto" (0) replaced by :func:`choose`'s answer
    on the visible GPUs (one rank on the CPU); a given ``pipeline_parallel_size`` above 1 is kept."""
    import dataclasses

    import torch

    from gpu_worker.config import AUTO_TENSOR_PARALLEL

    if config.tensor_parallel_size != AUTO_TENSOR_PARALLEL:
        return config
    if device.type != "cuda":
        choice = ParallelChoice(1, config.pipeline_parallel_size, "no GPU: one rank per pipeline stage")
    else:
        total = torch.cuda.get_device_properties(device).total_memory
        devices = torch.cuda.device_count()
        choice = choose(hf_config, element_size, total, devices, config.gpu_memory_utilization,
                        config.max_model_len, pipeline=config.pipeline_parallel_size,
                        kv_element_size=kv_element_size)
    logger.info(
        "tensor_parallel_size auto: TP=%d x PP=%d (%s)",
        choice.tensor_parallel_size, choice.pipeline_parallel_size, choice.reason,
    )
    return dataclasses.replace(
        config, tensor_parallel_size=choice.tensor_parallel_size,
        pipeline_parallel_size=choice.pipeline_parallel_size,
    )
