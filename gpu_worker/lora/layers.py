"""LoRA in the model's linear layers: every adapter resident, a slot each, mixed per token.

Each LoRA'd projection of the decoder (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``)
gets a :class:`LoraLinear`: the stacked ``A`` ``[S, R, in]`` and ``B`` ``[S, out, R]`` of every
adapter (slot ``s = i + 1`` holds adapter ``i``; slot 0 is "no adapter": zeros, scale 0) and
adds ``scale[s] * (x A_s^T) B_s^T`` to the layer's output for each token ``t`` of slot ``s``
(kernels ``lora_shrink`` / ``lora_expand``: a batch may mix adapters token by token). The
token -> slot map of the step is one shared :class:`LoraSlots` buffer, written by the runner
before each forward; its address never changes, so CUDA graphs replay with the step's map.

A fused layer's sub-projections (q, k, v; gate, up) each take ``max_rank`` columns of ``R``:
``A`` stacks their ``A``s, ``B`` is block-diagonal (sub-projection ``i``'s rows of the output
read only its columns), so one product serves all of them. Tensor parallelism shards like the
weights: a column-parallel layer keeps ``A`` whole and its rows of ``B`` (the rows the layer's
``shard_rows`` says it holds); a row-parallel layer keeps its columns of ``A`` and ``B`` whole,
and its partial product joins the layer's own before the all-reduce: ``sum_r (x_r A_r^T) B^T``
is ``(x A^T) B^T``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gpu_worker.lora.adapter import LoraAdapter
from gpu_worker.model_executor.layers.parallel import ColumnParallelLinear, RowParallelLinear
from kernels import KernelOps, reference

# model attribute path under a decoder layer -> the HF projections fused in it, in order
LORA_LAYERS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}
# Host staging buffers, reused in turn: a step's copy may not have run yet while the next steps
# are planned (async scheduling: 2 in flight; pipeline stages: one per stage, up to 8 here).
_HOST_RING = 16


class LoraSlots:
    """The step's token -> LoRA slot map (``slots[t]``; 0: the base model), shared by every
    LoRA layer of one model. :meth:`set` writes it in place: its device buffer never moves."""

    def __init__(self, max_tokens: int, device: torch.device) -> None:
        self.device = device
        self.slots = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._host = [torch.zeros(max_tokens, dtype=torch.int32, pin_memory=pin) for _ in range(_HOST_RING)]
        self._next = 0

    def set(self, counts: Sequence[int], slots: Sequence[int], num_tokens: int) -> None:
        """Token ``t`` of request ``i`` (``counts[i]`` tokens each, packed in order) runs with
        slot ``slots[i]``; tokens up to ``num_tokens`` past them (a graph's padding) with none."""
        host = self._host[self._next]
        self._next = (self._next + 1) % _HOST_RING
        values = host.numpy()
        filled = int(sum(counts))
        values[:filled] = np.repeat(np.asarray(slots, dtype=np.int32), np.asarray(counts, dtype=np.int64))
        values[filled:num_tokens] = 0
        self.slots[:num_tokens].copy_(host[:num_tokens], non_blocking=True)


class LoraLinear:
    """One layer's stacked adapters and the op that applies them (see the module)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, slots: LoraSlots,
                 ops: KernelOps) -> None:
        self.a, self.b, self.scales, self.slots = a, b, scales, slots
        self._shrink: Callable[..., torch.Tensor] = ops.lora_shrink or reference.lora_shrink
        self._expand: Callable[..., torch.Tensor] = ops.lora_expand or reference.lora_expand

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the layer's product with ``x``, ``[T, out]``) plus each token's adapter term."""
        ids = self.slots.slots[: x.shape[0]]
        return self._expand(y, self._shrink(x, self.a, ids), self.b, ids, self.scales)


def _decoder_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(HF layer index, layer) of this rank's decoder layers (a pipeline stage's placeholders
    for the other stages' layers have no projections)."""
    layers: Any = model.get_submodule("model.layers")
    return [(i, layer) for i, layer in enumerate(layers) if hasattr(layer, "self_attn")]


def _stack(linear: Any, layer: int, projections: tuple[str, ...], adapters: Sequence[LoraAdapter],
           max_rank: int, dtype: torch.dtype, device: torch.device,
           num_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``A`` ``[S, R, in_local]`` and ``B`` ``[S, out_local, R]`` of one layer
    (``S``: ``num_slots + 1``, default one slot per adapter; the slots past them zero)."""
    rank_cols = len(projections) * max_rank
    column = isinstance(linear, ColumnParallelLinear)
    assert column or isinstance(linear, RowParallelLinear)
    out_local, in_local = int(linear.out_features_local), int(linear.in_features_local)
    slots = (len(adapters) if num_slots is None else num_slots) + 1
    a = torch.zeros(slots, rank_cols, in_local, dtype=torch.float32)
    b = torch.zeros(slots, out_local, rank_cols, dtype=torch.float32)
    for slot, adapter in enumerate(adapters, start=1):
        for i, proj in enumerate(projections):
            pair = adapter.weights.get((layer, proj))
            if pair is None:
                continue
            lo_a, lo_b = pair
            r, cols = lo_a.shape[0], slice(i * max_rank, i * max_rank + lo_a.shape[0])
            if column:
                dst, src, rows = linear.shard_rows(i)
                a[slot, cols, :] = lo_a
                b[slot, dst:dst + rows, cols] = lo_b[src:src + rows, :r]
            else:
                start = linear.tp.rank * in_local
                a[slot, cols, :] = lo_a[:, start:start + in_local]
                b[slot, :, cols] = lo_b
    return a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous()


def attach_lora(model: nn.Module, adapters: Sequence[LoraAdapter], *, max_rank: int, max_tokens: int,
                device: torch.device, dtype: torch.dtype, ops: KernelOps,
                num_slots: int | None = None) -> LoraSlots:
    """Give every LoRA'd projection of ``model`` (this rank's shard) its :class:`LoraLinear`;
    returns the shared slot map (also ``model.lora_slots``). ``num_slots`` (at least the
    adapters; default as many): slots past the adapters stay empty for :func:`write_slot`."""
    total = len(adapters) if num_slots is None else num_slots
    if any(not hasattr(layer.get_submodule("mlp"), "gate_up_proj") for _, layer in _decoder_layers(model)):
        raise ValueError("lora_modules / lora_root: LoRA adapters are not served for mixture-of-experts "
                         "models (their expert layers take no adapter)")
    slots = LoraSlots(max_tokens, device)
    scaling = [a.scaling for a in adapters] + [0.0] * (total - len(adapters))
    scales = torch.tensor([0.0, *scaling], dtype=torch.float32, device=device)
    for index, layer in _decoder_layers(model):
        for path, projections in LORA_LAYERS.items():
            linear: Any = layer.get_submodule(path)
            a, b = _stack(linear, index, projections, adapters, max_rank, dtype, device, total)
            linear.lora = LoraLinear(a, b, scales, slots, ops)
    setattr(model, "lora_slots", slots)  # noqa: B010 - a plain attribute, not a submodule
    return slots


def write_slot(model: nn.Module, adapter: LoraAdapter | None, slot: int, max_rank: int) -> None:
    """Put ``adapter`` in LoRA slot ``slot`` of every LoRA layer of ``model`` (None: empty it), in
    place: the stacks never move, so captured CUDA graphs replay with it. The caller makes sure no
    token of a step in flight reads the slot (a slot is written only while no request holds it)."""
    scales = None
    with torch.no_grad():
        for index, layer in _decoder_layers(model):
            for path, projections in LORA_LAYERS.items():
                linear: Any = layer.get_submodule(path)
                lora: LoraLinear = linear.lora
                if adapter is None:
                    lora.a[slot].zero_()
                    lora.b[slot].zero_()
                else:
                    a, b = _stack(linear, index, projections, [adapter], max_rank, lora.a.dtype,
                                  lora.a.device)
                    lora.a[slot].copy_(a[1])
                    lora.b[slot].copy_(b[1])
                scales = lora.scales
        if scales is not None:  # one tensor shared by the layers
            scales[slot] = 0.0 if adapter is None else adapter.scaling
