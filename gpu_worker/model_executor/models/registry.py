"""HF ``architectures`` name -> model class, imported lazily."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import MappingProxyType

from torch import nn

_PKG = "gpu_worker.model_executor.models"

# Read-only: architecture name -> (module, class name).
_MODELS = MappingProxyType(
    {
        "LlamaForCausalLM": (f"{_PKG}.llama", "LlamaForCausalLM"),
        "LlavaForConditionalGeneration": (f"{_PKG}.llava", "LlavaForConditionalGeneration"),
        "MistralForCausalLM": (f"{_PKG}.llama", "MistralForCausalLM"),
        "MixtralForCausalLM": (f"{_PKG}.moe", "MixtralForCausalLM"),
        "Qwen2ForCausalLM": (f"{_PKG}.llama", "Qwen2ForCausalLM"),
        "Qwen2MoeForCausalLM": (f"{_PKG}.moe", "Qwen2MoeForCausalLM"),
        "Qwen3ForCausalLM": (f"{_PKG}.qwen3", "Qwen3ForCausalLM"),
        "Qwen3MoeForCausalLM": (f"{_PKG}.moe", "Qwen3MoeForCausalLM"),
    }
)


# Architectures that take images: their configs are read flattened (loader.load_hf_config).
MULTIMODAL_ARCHITECTURES = frozenset({"LlavaForConditionalGeneration"})


def resolve_model_class(architectures: Sequence[str] | None) -> type[nn.Module]:
    """The first supported class among ``architectures``; ``ValueError`` when none is."""
    for arch in architectures or ():
        if arch in _MODELS:
            module, name = _MODELS[arch]
            cls: type[nn.Module] = getattr(importlib.import_module(module), name)
            return cls
    raise ValueError(
        f"unsupported model architectures {list(architectures or [])}; supported: {list(_MODELS)}"
    )
