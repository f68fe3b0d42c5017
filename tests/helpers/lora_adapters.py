"""Random LoRA adapters in the PEFT format, and the HF reference with an adapter merged.

- :func:`write_random_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT's
  ``save_pretrained`` writes them, for a model folder (tiny models of ``tiny_models.py``), with
  random A and B (B not zero, unlike PEFT's initialization, so the adapter changes the outputs).
- :func:`merged_model`: the HF model with ``W + scaling * B @ A`` in place of every adapted
  projection: the reference a LoRA-serving engine must match token for token in float32.

The reference reads the adapter on its own (no ``gpu_worker.lora`` parsing, no ``peft``), so a
bug of the loader under test cannot hide in its reference.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {p: "self_attn" if p in PROJECTIONS[:4] else "mlp" for p in PROJECTIONS}
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(?:\.default)?\.weight")


def _features(config: Any, projection: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection of an HF Llama-family config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }[projection]


def write_random_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = PROJECTIONS,
    seed: int = 0,
    std: float = 0.05,
    use_rslora: bool = False,
    layers: Sequence[int] | None = None,
) -> Path:
    """Write a random float32 adapter for the model in ``model_dir`` into ``out_dir`` (returned).

    A and B are ``N(0, std)``; with the defaults (``rank`` 8, scaling 2) each adapted weight moves
    by about 14% of the tiny models' weight scale: greedy text changes, logits stay finite.
    ``layers``: only those layers (``layers_to_transform``), else all.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    chosen = list(range(config.num_hidden_layers)) if layers is None else list(layers)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in chosen:
        for projection in targets:
            in_features, out_features = _features(config, projection)
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[projection]}.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * std
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None if layers is None else chosen,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def merged_model(model_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The HF ``AutoModelForCausalLM`` of ``model_dir`` (eval mode, ``dtype``) with the adapter of
    ``adapter_dir`` merged: ``W += scaling * B @ A`` (in float32) for every adapted projection."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        match = _KEY.fullmatch(key)
        assert match is not None, f"not a LoRA tensor: {key}"
        halves.setdefault(match["module"], {})[match["half"]] = tensor.float()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        for module, pair in halves.items():
            linear = model.get_submodule(module)
            assert isinstance(linear, torch.nn.Linear), f"{module} is not an nn.Linear"
            merged = linear.weight.float() + scaling * (pair["B"] @ pair["A"])
            linear.weight.copy_(merged.to(linear.weight.dtype))
    return model
