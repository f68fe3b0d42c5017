"""Run a tiny random model of one family through a prefill and decode steps over paged caches.

Shared by the in-process CPU layer tests and the interpreted Triton model check (run in a
subprocess; see ``test_model_triton_interpret.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gpu_worker.model_executor.layers.attention import AttentionMetadata
from gpu_worker.model_executor.layers.quantization.base import LinearMethod
from gpu_worker.model_executor.model_config import head_dim_of
from gpu_worker.model_executor.models.registry import resolve_model_class
from gpu_worker.model_executor.weights import fill_random
from kernels import KernelOps

BLOCK = 4
# (seq_lens, q_lens) per step: a prefill of three sequences (crossing block boundaries), then
# two decode steps.
# A prefill, two decode steps, then a mixed step whose two decodes lead a chunk of 4 tokens
# (``num_decodes`` 2: attention may send them to its decode kernel).
STEPS = [([5, 9, 3], [5, 9, 3]), ([6, 10, 4], [1, 1, 1]), ([7, 11, 5], [1, 1, 1]), ([8, 12, 9], [1, 1, 4])]


def build_model(cfg: Any, ops: KernelOps, dtype: torch.dtype = torch.float32,
                linear: Callable[[str], LinearMethod] | None = None) -> nn.Module:
    """The registry's class for ``cfg`` on the CPU with ``ops``, seeded random weights;
    ``linear``: each linear layer's method (default: the model's plain one), finished after
    the weights as the loader does (``process_weights_after_loading``)."""
    cls = resolve_model_class(cfg.architectures or [type(cfg).__name__.replace("Config", "ForCausalLM")])
    extra = {} if linear is None else {"linear": linear}
    with torch.device("cpu"):
        model = cls(cfg, ops, dtype, **extra)  # type: ignore[call-arg]
    fill_random(model, seed=5, std=0.2)
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    return model.requires_grad_(False).eval()


def step_metadata(seq_lens: list[int], q_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """Sequence ``s`` owns blocks ``10 s ..``; returns the metadata and the positions."""
    starts, slots, positions = [0], [], []
    for s, (n, q) in enumerate(zip(seq_lens, q_lens, strict=True)):
        starts.append(starts[-1] + q)
        for pos in range(n - q, n):
            positions.append(pos)
            slots.append((10 * s + pos // BLOCK) * BLOCK + pos % BLOCK)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(
            [[10 * s + b for b in range(10)] for s in range(len(seq_lens))], dtype=torch.int32
        ),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        num_decodes=next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens)),
    )
    return md, torch.tensor(positions)


def run_steps(
    model: nn.Module, cfg: Any, steps: list[tuple[list[int], list[int]]], dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Logits of a prefill then decode steps over fresh caches (token ids from the positions)."""
    shape = (2, 10 * len(steps[0][0]), BLOCK, cfg.num_key_value_heads, head_dim_of(cfg))
    caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
    out = []
    with torch.inference_mode():
        for seq_lens, q_lens in steps:
            md, positions = step_metadata(seq_lens, q_lens)
            ids = (positions * 7 + 3) % cfg.vocab_size
            out.append(model.compute_logits(model(ids, positions, md, caches)))  # type: ignore[operator]
    return out
