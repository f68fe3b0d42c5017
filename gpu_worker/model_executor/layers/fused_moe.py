"""Mixture-of-experts MLP: a router picks each token's top-k experts, one fused op runs them
(``KernelOps.fused_moe``: the torch reference on CPU, the Triton kernels on CUDA).

The experts are stacked: ``w13`` ``[E, 2 * I_local, H]`` (each expert's gate rows, then its up
rows) and ``w2`` ``[E, H, I_local]``. Tensor parallelism splits every expert's intermediate size
``I`` as a dense MLP's is split (gate/up rows column-parallel, down columns row-parallel): each rank
runs every expert on its share of ``I`` and one all-reduce sums the partial outputs, so no
token moves between ranks and the routing (replicated) is the same on every rank.

Checkpoints come in two layouts, both read here: per expert (``experts.{e}.w1/w3/w2.weight`` as
Mixtral publishes them, ``experts.{e}.gate_proj/up_proj/down_proj.weight`` as Qwen-MoE does) and
transformers 5's stacked one (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj``
``[E, H, I]``). Weights are 16/32-bit only (a quantized MoE checkpoint is refused at load).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from gpu_worker.distributed.parallel_state import TensorParallelGroup
from gpu_worker.model_executor.layers.parallel import divide
from gpu_worker.model_executor.weights import TensorSource
from kernels import KernelOps
from kernels.quant_reference import FP8_DTYPE, quantize_fp8_rows

# Per-expert checkpoint names -> (our parameter, part): 0 gate rows, 1 up rows, 2 down.
_EXPERT_PARTS = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": 2, "down_proj": 2}


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts and their float32 weights: softmax over the experts in
    float32, the ``top_k`` largest, renormalized to sum 1 when ``renormalize`` (Mixtral; Qwen-MoE's
    ``norm_topk_prob``), as HF transformers routes."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """``num_experts`` SiLU-gated experts of ``hidden_size`` -> ``intermediate_size`` -> hidden,
    ``top_k`` per token, behind a linear router ``gate`` ``[E, H]`` (replicated).

    ``fp8``: the experts are held in e4m3 with one float32 scale per row (``w13_scale``
    ``[E, 2 * I_local]``, ``w2_scale`` ``[E, H]``), quantized one expert's tensor at a time as the
    16/32-bit checkpoint loads (the layer never holds its experts in 16 bits); the activations
    stay 16-bit (W8A16). A down row's scale comes from the whole row, every rank's columns, so
    tensor parallelism computes the codes one rank would."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool, dtype: torch.dtype, tp: TensorParallelGroup, ops: KernelOps,
                 fp8: bool = False) -> None:
        super().__init__()
        if ops.fused_moe is None:
            raise ValueError(f"kernel set {ops.name!r} has no fused_moe: it serves no MoE model")
        self._fused_moe: Callable[..., torch.Tensor] = ops.fused_moe
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.tp = tp
        self.fp8 = fp8
        self.intermediate_local = divide(intermediate_size, tp.size, "the experts' intermediate size")
        local = self.intermediate_local
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.gate.weight.requires_grad_(False)
        weight_dtype = FP8_DTYPE if fp8 else dtype
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size, dtype=weight_dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, local, dtype=weight_dtype),
                               requires_grad=False)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        if fp8:
            self.w13_scale = nn.Parameter(torch.empty(num_experts, 2 * local), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self._fused_moe(x, self.w13, self.w2, weights, ids, self.w13_scale, self.w2_scale)
        return self.tp.all_reduce(out) if self.tp.size > 1 else out

    # -- loading ---------------------------------------------------------------------
    def _put_rows(self, expert: int, kind: int, rows: torch.Tensor) -> None:
        """This rank's gate (``kind`` 0) or up (1) rows ``[I_local, H]`` of one expert."""
        local = self.intermediate_local
        span = slice(kind * local, (kind + 1) * local)
        with torch.no_grad():
            if self.w13_scale is None:
                self.w13[expert, span].copy_(rows)
                return
            q, scale = quantize_fp8_rows(rows.to(self.w13.device))
            self.w13[expert, span].copy_(q)
            self.w13_scale[expert, span].copy_(scale.squeeze(-1))

    def _put_down(self, expert: int, source: TensorSource) -> None:
        """One expert's down projection ``[H, I]``: this rank's columns, read alone (16/32-bit) or
        with the whole rows (fp8: a row's scale comes from the whole row)."""
        start, local = self.tp.rank * self.intermediate_local, self.intermediate_local
        with torch.no_grad():
            if self.w2_scale is None:
                self.w2[expert].copy_(source.narrow(1, start, local))
                return
            rows = source.full().to(self.w2.device)
            amax = rows.float().abs().amax(dim=-1, keepdim=True)
            q, scale = quantize_fp8_rows(rows[:, start:start + local], amax)
            self.w2[expert].copy_(q)
            self.w2_scale[expert].copy_(scale.squeeze(-1))

    def load_expert(self, expert: int, part: str, source: TensorSource) -> None:
        """One expert's checkpoint tensor (``w1``/``gate_proj``, ``w3``/``up_proj``,
        ``w2``/``down_proj``; HF's ``[out, in]``): this rank's share of ``I``."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside [0, {self.num_experts})")
        kind = _EXPERT_PARTS[part]
        if kind == 2:
            self._put_down(expert, source)
        else:
            self._put_rows(expert, kind, source.narrow(0, self.tp.rank * self.intermediate_local,
                                                       self.intermediate_local))

    def load_stacked(self, name: str, source: TensorSource) -> None:
        """transformers 5's stacked tensors, one expert at a time: ``gate_up_proj`` ``[E, 2I, H]``
        or ``down_proj`` ``[E, H, I]``."""
        start, local = self.tp.rank * self.intermediate_local, self.intermediate_local
        full = source.shape[1] // 2
        for expert in range(self.num_experts):
            tensor = source.narrow(0, expert, 1)[0]
            if name == "down_proj":
                self._put_down(expert, TensorSource.of(tensor))
            else:
                self._put_rows(expert, 0, tensor[start:start + local])
                self._put_rows(expert, 1, tensor[full + start:full + start + local])

    def load(self, name: str, source: TensorSource, shard: int = 0) -> Iterable[str]:
        """The model loader's hook: ``name`` is ``gate.weight``, ``experts.{e}.{part}.weight``
        (per expert) or ``experts.gate_up_proj`` / ``experts.down_proj`` (stacked); the
        parameter names filled (an expert's tensors fill a part of ``w13`` / ``w2``, and their
        scales with fp8)."""
        if name == "gate.weight":
            with torch.no_grad():
                self.gate.weight.copy_(source.full())
            return ("gate.weight",)
        parts = name.split(".")
        if len(parts) == 2 and parts[1] in ("gate_up_proj", "down_proj"):
            self.load_stacked(parts[1], source)
            return self._filled(down=parts[1] == "down_proj")
        if len(parts) == 4 and parts[0] == "experts" and parts[1].isdigit() and parts[2] in _EXPERT_PARTS:
            self.load_expert(int(parts[1]), parts[2], source)
            return self._filled(down=_EXPERT_PARTS[parts[2]] == 2)
        raise ValueError(f"unexpected MoE tensor {name!r}")

    def _filled(self, down: bool) -> tuple[str, ...]:
        name = "w2" if down else "w13"
        return (name, f"{name}_scale") if self.fp8 else (name,)

    def fill_random(self, seed: int, std: float) -> bool:
        """Dummy fp8 experts: each expert drawn in 16 bits, then quantized as a checkpoint's
        would be (False for 16/32-bit experts: the plain random fill draws them)."""
        if not self.fp8:
            return False
        generator = torch.Generator(device=self.w13.device)
        generator.manual_seed(seed)
        hidden, local = self.w2.shape[1], self.intermediate_local
        for expert in range(self.num_experts):
            for kind in (0, 1):
                self._put_rows(expert, kind, torch.randn(local, hidden, generator=generator,
                                                         device=self.w13.device) * std)
            down = torch.randn(hidden, local * self.tp.size, generator=generator, device=self.w2.device) * std
            self._put_down(expert, TensorSource.of(down))
        return True
