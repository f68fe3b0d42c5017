"""LLaVA-1.5: a CLIP vision tower and a two-layer projector in front of a Llama decoder.

The decoder is :class:`LlamaForCausalLM`'s, unchanged (our kernels, tensor and pipeline
parallel shards, quantized linear methods): the engine reads its config as the checkpoint's text
config, flattened by ``loader.load_hf_config``, whose ``multimodal_config`` keeps the whole
LLaVA config. :meth:`LlavaForConditionalGeneration.embed_images` turns pictures into features
of the decoder's width, one per image token (``gpu_worker/worker/image_features.py`` puts them
in place of the image tokens' embeddings). The tower and projector are small: replicated on
every tensor-parallel rank, built on the first pipeline stage only (the one that embeds).

Both checkpoint layouts load: llava-hf's published names (``language_model.model.*``,
``vision_tower.vision_model.*``), which transformers 5 writes too (without ``vision_model.``),
and transformers 5's module names (``model.language_model.*``, ``model.vision_tower.*``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gpu_worker.distributed.parallel_state import ModelParallel
from gpu_worker.model_executor.models.clip import ClipVisionTower, activation, hidden_state_indices
from gpu_worker.model_executor.models.llama import LinearMethods, LlamaForCausalLM, plain_linear
from kernels import KernelOps

# Checkpoint name prefixes -> ours, first match wins (the longer prefixes first).
_RENAMES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
FEATURE_STRATEGIES = ("default", "full")


def check_llava_config(mm: Any) -> None:
    """``ValueError`` for a LLaVA this engine does not serve: a vision tower that is not CLIP, a
    feature strategy other than ``default`` / ``full``."""
    vision_type = getattr(mm.vision_config, "model_type", None)
    if vision_type != "clip_vision_model":
        raise ValueError(f"LLaVA with a {vision_type!r} vision tower is not served (CLIP only)")
    strategy = getattr(mm, "vision_feature_select_strategy", "default")
    if strategy not in FEATURE_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not served; "
                         f"served: {FEATURE_STRATEGIES}")


class LlavaProjector(nn.Module):
    """Vision features -> the decoder's width: ``linear_1``, activation, ``linear_2``."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(LlamaForCausalLM):
    """LLaVA-1.5 (``hf_config``: the flattened text config with ``multimodal_config``)."""

    def __init__(
        self,
        hf_config: Any,
        ops: KernelOps,
        dtype: torch.dtype = torch.float32,
        parallel: ModelParallel | None = None,
        linear: LinearMethods = plain_linear,
    ) -> None:
        super().__init__(hf_config, ops, dtype, parallel=parallel, linear=linear)
        mm = hf_config.multimodal_config
        check_llava_config(mm)
        vision = mm.vision_config
        layers = hidden_state_indices(mm.vision_feature_layer, int(vision.num_hidden_layers))
        self.keep_cls = getattr(mm, "vision_feature_select_strategy", "default") == "full"
        self.vision_tower: ClipVisionTower | None = None
        self.multi_modal_projector: LlavaProjector | None = None
        if self.parallel.is_first_stage:
            self.vision_tower = ClipVisionTower(vision, layers).to(dtype)
            self.multi_modal_projector = LlavaProjector(
                int(vision.hidden_size) * len(layers), int(hf_config.hidden_size),
                str(mm.projector_hidden_act), bool(getattr(mm, "multimodal_projector_bias", True)),
            ).to(dtype)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, tokens per image, H]`` in the model's dtype (first stage)."""
        if self.vision_tower is None or self.multi_modal_projector is None:
            raise RuntimeError("only the first pipeline stage embeds images")
        weight = self.multi_modal_projector.linear_1.weight
        states = self.vision_tower(pixel_values.to(weight.dtype))
        if not self.keep_cls:
            states = states[:, 1:]
        features: torch.Tensor = self.multi_modal_projector(states)
        return features

    def _targets(self, name: str) -> list[tuple[str, int]]:
        for old, new in _RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return [] if name.endswith(".position_ids") else [(name, 0)]
        return super()._targets(name)
