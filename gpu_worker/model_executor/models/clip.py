"""The CLIP vision transformer, as LLaVA reads it: patch features of one of its hidden layers.

Plain torch (an image step runs once per image, eagerly): a convolution cuts the picture into
patches, a class embedding and learned positions join them, ``pre_layrnorm``, then pre-norm
encoder layers with bidirectional attention. Module and parameter names are HF's
(``embeddings.patch_embedding``, ``encoder.layers.N.self_attn.q_proj`` ...), so checkpoint
tensors load by name. Only the layers up to the deepest one read are built: LLaVA reads the
second to last, so the last layer and ``post_layernorm`` are never computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """An HF ``hidden_act`` by name; ``ValueError`` for one not served."""
    acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gelu": F.gelu,
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }
    if name not in acts:
        raise ValueError(f"activation {name!r} is not served; served: {sorted(acts)}")
    return acts[name]


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        dim, patch = int(cfg.hidden_size), int(cfg.patch_size)
        self.patch_embedding = nn.Conv2d(int(cfg.num_channels), dim, kernel_size=patch, stride=patch,
                                         bias=False)
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.num_positions = (int(cfg.image_size) // patch) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, 1 + patches, D]``."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.num_positions:
            raise ValueError(f"pixel_values give {x.shape[1]} positions; the tower has {self.num_positions} "
                             "(the image processor must crop to the tower's image_size)")
        return x + self.position_embedding.weight


class ClipAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        dim = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, heads, d // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ClipMLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.act = activation(str(cfg.hidden_act))
        self.fc1 = nn.Linear(int(cfg.hidden_size), int(cfg.intermediate_size))
        self.fc2 = nn.Linear(int(cfg.intermediate_size), int(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        dim, eps = int(cfg.hidden_size), float(cfg.layer_norm_eps)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: Any, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(num_layers))


def hidden_state_indices(feature_layer: int | Sequence[int], num_layers: int) -> list[int]:
    """HF ``hidden_states`` indices (0: the embeddings after ``pre_layrnorm``, k: after layer k)
    that ``vision_feature_layer`` names (negative: from the end)."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    out = [k if k >= 0 else num_layers + 1 + k for k in layers]
    if not out or any(not 0 <= k <= num_layers for k in out):
        raise ValueError(f"vision_feature_layer {feature_layer!r} is outside the tower's {num_layers} layers")
    return out


class ClipVisionTower(nn.Module):
    """CLIP's vision transformer up to its deepest ``feature_layers`` (HF ``hidden_states`` indices)."""

    def __init__(self, cfg: Any, feature_layers: Sequence[int]) -> None:
        super().__init__()
        self.feature_layers = tuple(feature_layers)
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(int(cfg.hidden_size), eps=float(cfg.layer_norm_eps))
        self.encoder = ClipEncoder(cfg, max(self.feature_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> the feature layers' states concatenated, ``[B, 1 + patches, D * n]``."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return torch.cat([states[k] for k in self.feature_layers], dim=-1)
