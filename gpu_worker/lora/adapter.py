"""LoRA adapters in the PEFT format, read and validated for the Llama-family decoder.

An adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``, as PEFT's
``save_pretrained`` writes it. Tensors are named
``base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>[.default].weight``; for
every targeted projection ``W`` (``[out, in]``) the adapted layer computes
``x @ (W + scaling * B @ A).T`` with ``A: [r, in]``, ``B: [out, r]``.

Served: plain LoRA on the seven decoder projections (``q/k/v/o_proj``, ``gate/up/down_proj``),
one ``r`` and one ``lora_alpha`` for every module. Everything else PEFT can express (DoRA,
biases, per-module ranks, ``modules_to_save``, ``lm_head`` or embedding targets, ...) is refused
with a :class:`ValueError` naming the adapter and the problem, never ignored: an ignored part
would silently change the outputs. ``adapter_model.bin`` is refused without being read: it is a
pickle, and unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpu_worker.model_executor.model_config import head_dim_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The submodule of a decoder layer that holds each projection (HF Llama naming).
_PARENT = MappingProxyType(
    {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
     "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
)
# Linear/embedding modules of the model outside the decoder projections: never adapted.
_OTHER_MODULES = ("model.embed_tokens", "lm_head")

_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_(A|B)(?:\.default)?\.weight")
# Hints for tensors that are not LoRA pairs of a decoder projection.
_KEY_HINTS = (
    ("lora_magnitude_vector", "a DoRA magnitude (DoRA is not supported)"),
    ("lora_embedding", "a LoRA on the embedding (only decoder projections can be adapted)"),
    ("embed_tokens", "an embedding tensor (only decoder projections can be adapted)"),
    ("lm_head", "an lm_head tensor (only decoder projections can be adapted)"),
    (".bias", "a bias (only bias 'none' is supported)"),
)

# Config fields that must be unset, false or empty, with why.
_UNSUPPORTED = MappingProxyType(
    {
        "use_dora": "DoRA adapters are not supported",
        "fan_in_fan_out": "transposed (Conv1D-layout) weights are not supported",
        "modules_to_save": "adapters that replace whole modules are not supported",
        "rank_pattern": "per-module ranks are not supported: every module must use r",
        "alpha_pattern": "per-module alphas are not supported: every module must use lora_alpha",
        "lora_bias": "a bias on lora_B is not supported",
        "layer_replication": "layer replication is not supported",
        "target_parameters": "LoRA on bare parameters is not supported",
        "trainable_token_indices": "trained token embeddings are not supported",
    }
)


class AdapterShapes(TypedDict):
    """The model sizes :func:`load_adapter` checks an adapter against (its keyword arguments)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    q_size: int  # num_attention_heads * head_dim
    kv_size: int  # num_key_value_heads * head_dim


def adapter_shapes_of(hf_config: Any) -> AdapterShapes:
    """The sizes of a Llama-family HF config, for ``load_adapter(name, path, **shapes, max_rank=...)``."""
    head_dim = head_dim_of(hf_config)
    num_heads = int(hf_config.num_attention_heads)
    num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    return AdapterShapes(
        hidden_size=int(hf_config.hidden_size),
        intermediate_size=int(hf_config.intermediate_size),
        num_layers=int(hf_config.num_hidden_layers),
        q_size=num_heads * head_dim,
        kv_size=num_kv_heads * head_dim,
    )


def module_name(layer: int, projection: str) -> str:
    """The HF module name of a decoder projection: ``model.layers.3.self_attn.q_proj``."""
    return f"model.layers.{layer}.{_PARENT[projection]}.{projection}"


@dataclass(frozen=True)
class LoraAdapter:
    """One validated adapter, full (unsharded) float32 CPU weights.

    ``weights[(layer, projection)] = (A [rank, in_features], B [out_features, rank])`` for each
    adapted projection; a projection absent from ``weights`` is not adapted in that layer. The
    adapted output is ``base + scaling * (x @ A.T) @ B.T``.
    """

    name: str
    path: str
    rank: int
    scaling: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) with use_rslora
    weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA adapter {self.name!r}: rank must be positive, got {self.rank}")
        for (layer, projection), (a, b) in self.weights.items():
            if projection not in _PARENT or a.dim() != 2 or b.dim() != 2:
                raise ValueError(f"LoRA adapter {self.name!r}: bad weights for ({layer}, {projection!r})")
            if a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise ValueError(
                    f"LoRA adapter {self.name!r}: {module_name(layer, projection)} has A "
                    f"{list(a.shape)} and B {list(b.shape)}, not of rank {self.rank}"
                )

    @property
    def target_projections(self) -> tuple[str, ...]:
        """The projections adapted in at least one layer, in :data:`PROJECTIONS` order."""
        present = {projection for _, projection in self.weights}
        return tuple(p for p in PROJECTIONS if p in present)

    @property
    def target_layers(self) -> tuple[int, ...]:
        """The layers with at least one adapted projection, ascending."""
        return tuple(sorted({layer for layer, _ in self.weights}))


def load_adapter(
    name: str,
    path: str | Path,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    q_size: int,
    kv_size: int,
    max_rank: int,
) -> LoraAdapter:
    """Read and validate the PEFT adapter in folder ``path`` for a model of these sizes.

    ``target_modules`` is a list (PEFT's rule: each entry names a module or a dotted suffix of
    it, e.g. ``q_proj``), a regex matched against full module names, or ``"all-linear"``;
    ``layers_to_transform`` (list targets only) and ``exclude_modules`` narrow it as in PEFT.

    Raises :class:`ValueError` (message ``LoRA adapter '<name>': <problem>``) for: a missing
    folder, config or safetensors file (a pickled ``adapter_model.bin`` is refused unread); a
    ``peft_type`` other than LORA, ``bias`` other than "none", any of ``use_dora``,
    ``fan_in_fan_out``, ``modules_to_save``, ``rank_pattern``, ``alpha_pattern``, ``lora_bias``,
    ``layer_replication``, ``target_parameters``, ``trainable_token_indices`` set; ``r`` not a
    positive integer or above ``max_rank``; ``lora_alpha`` not finite; a target that is not a
    decoder projection (``lm_head``, ``embed_tokens``, ...); ``layers_to_transform`` out of
    range; a tensor that is not a LoRA pair of a decoder projection, of a layer out of range, of a
    module the config does not select, or a selected module without tensors; a lone A or B; a
    shape that does not match the model and ``r``; a non-float dtype; non-finite values.
    """
    folder = Path(path)
    shapes = AdapterShapes(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
        q_size=q_size, kv_size=kv_size,
    )
    config = _read_config(name, folder)
    rank, scaling = _rank_and_scaling(name, config, max_rank)
    targeted = _targeted_modules(name, config, num_layers)
    pairs = _pair_tensors(name, _read_tensors(name, folder), num_layers)
    _check_coverage(name, set(pairs), targeted)
    weights = {
        key: _checked_pair(name, key, *pairs[key], rank, shapes) for key in sorted(pairs, key=_in_model_order)
    }
    return LoraAdapter(
        name=name, path=str(folder), rank=rank, scaling=scaling, weights=MappingProxyType(weights)
    )


def _error(name: str, problem: str) -> ValueError:
    return ValueError(f"LoRA adapter {name!r}: {problem}")


def _read_config(name: str, folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise _error(name, f"{folder} is not a directory")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise _error(name, f"no {CONFIG_FILE} in {folder}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise _error(name, f"cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise _error(name, f"{config_file} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _error(name, f"peft_type {peft_type!r} is not supported (only LORA)")
    bias = config.get("bias", "none")
    if bias != "none":
        raise _error(name, f"bias {bias!r} is not supported (only bias 'none')")
    for field, why in _UNSUPPORTED.items():
        if config.get(field):
            raise _error(name, f"{field}={config[field]!r}: {why}")
    return config


def _rank_and_scaling(name: str, config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise _error(name, f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise _error(name, f"rank {rank} exceeds max_rank {max_rank}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _error(name, f"lora_alpha must be a finite number, got {alpha!r}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _error(name, f"use_rslora must be true or false, got {use_rslora!r}")
    return rank, float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def _matches(spec: str | list[str], module: str) -> bool:
    """PEFT's rule: a string is a regex on the full module name, a list entry names the module
    or a dotted suffix of it."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == entry or module.endswith(f".{entry}") for entry in spec)


def _targeted_modules(name: str, config: dict[str, Any], num_layers: int) -> frozenset[tuple[int, str]]:
    """The (layer, projection) pairs the config selects: target_modules, then layers_to_transform
    (list targets only, as in PEFT), minus exclude_modules."""
    candidates = {module_name(layer, p): (layer, p) for layer in range(num_layers) for p in PROJECTIONS}
    target = config.get("target_modules")
    layers = _layers_to_transform(name, config, num_layers)
    if target == "all-linear":
        target = list(PROJECTIONS)
    if isinstance(target, str):
        if layers is not None:
            raise _error(name, "layers_to_transform cannot be combined with a regex target_modules")
        _check_regex(name, "target_modules", target)
        for other in _OTHER_MODULES:
            if _matches(target, other):
                raise _error(name, f"target_modules {target!r} selects {other}: only decoder projections "
                                   f"({', '.join(PROJECTIONS)}) can be adapted")
        selected = {key for module, key in candidates.items() if _matches(target, module)}
    elif isinstance(target, list) and target and all(isinstance(entry, str) for entry in target):
        selected = set()
        for entry in target:
            hits = {key for module, key in candidates.items() if _matches([entry], module)}
            if not hits:
                raise _error(name, f"target module {entry!r} is not a decoder projection of this model "
                                   f"({', '.join(PROJECTIONS)}; {num_layers} layers)")
            selected |= hits
        if layers is not None:
            selected = {(layer, p) for layer, p in selected if layer in layers}
    else:
        raise _error(name, f"target_modules must be a non-empty list of names or a regex, got {target!r}")
    exclude = config.get("exclude_modules")
    if exclude:
        if not isinstance(exclude, (str, list)):
            raise _error(name, f"exclude_modules must be a list of names or a regex, got {exclude!r}")
        if isinstance(exclude, str):
            _check_regex(name, "exclude_modules", exclude)
        selected = {key for key in selected if not _matches(exclude, module_name(*key))}
    if not selected:
        raise _error(name, f"the config selects no decoder projection (target_modules {target!r})")
    return frozenset(selected)


def _check_regex(name: str, field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _error(name, f"{field} {pattern!r} is not a valid regex: {exc}") from exc


def _layers_to_transform(name: str, config: dict[str, Any], num_layers: int) -> frozenset[int] | None:
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    listed = [layers] if isinstance(layers, int) else layers
    if not isinstance(listed, list) or not all(type(i) is int for i in listed):
        raise _error(name, f"layers_to_transform must be an integer or a list of integers, got {layers!r}")
    for layer in listed:
        if not 0 <= layer < num_layers:
            raise _error(name, f"layers_to_transform names layer {layer}, out of range ({num_layers} layers)")
    return frozenset(listed)


def _read_tensors(name: str, folder: Path) -> dict[str, torch.Tensor]:
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = [file for file in _PICKLED_FILES if (folder / file).exists()]
        if pickled:
            raise _error(name, f"{folder} has {pickled[0]} but no {WEIGHTS_FILE}: pickled weights are never "
                               "loaded (unpickling runs arbitrary code); save the adapter as safetensors")
        raise _error(name, f"no {WEIGHTS_FILE} in {folder}")
    try:
        return load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise _error(name, f"cannot read {weights_file}: {exc}") from exc


def _pair_tensors(
    name: str, tensors: Mapping[str, torch.Tensor], num_layers: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Group the file's tensors into (A, B) per (layer, projection), refusing any other tensor."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            hint = next((why for part, why in _KEY_HINTS if part in key), "not a LoRA pair of a projection")
            raise _error(name, f"unexpected tensor {key!r}: {hint}")
        layer, parent, projection, half = int(match[1]), match[2], match[3], match[4]
        if _PARENT.get(projection) != parent:
            raise _error(name, f"tensor {key!r}: {parent}.{projection} is not a decoder projection "
                               f"({', '.join(PROJECTIONS)})")
        if layer >= num_layers:
            raise _error(name, f"tensor {key!r}: layer {layer} is out of range ({num_layers} layers)")
        slot = halves.setdefault((layer, projection), {})
        if half in slot:
            raise _error(name, f"two lora_{half} tensors for {module_name(layer, projection)}")
        slot[half] = tensor
    pairs = {}
    for (layer, projection), slot in halves.items():
        for half, other in (("A", "B"), ("B", "A")):
            if half not in slot:
                raise _error(name, f"{module_name(layer, projection)} has lora_{other} but no lora_{half}")
        pairs[(layer, projection)] = (slot["A"], slot["B"])
    return pairs


def _in_model_order(key: tuple[int, str]) -> tuple[int, int]:
    return key[0], PROJECTIONS.index(key[1])


def _check_coverage(name: str, present: set[tuple[int, str]], targeted: frozenset[tuple[int, str]]) -> None:
    """The file and the config must agree: PEFT saves a pair for every module it adapted."""
    extra = sorted(present - targeted, key=_in_model_order)
    if extra:
        raise _error(name, f"tensors for {module_name(*extra[0])}, which the config does not target "
                           "(target_modules / layers_to_transform / exclude_modules)")
    missing = sorted(targeted - present, key=_in_model_order)
    if missing:
        raise _error(name, f"the config targets {module_name(*missing[0])} but the file has no lora_A/lora_B "
                           f"for it ({len(missing)} targeted modules without tensors)")


def _features(projection: str, shapes: AdapterShapes) -> tuple[int, int]:
    """(in_features, out_features) of a full (unsharded) projection."""
    hidden, inter = shapes["hidden_size"], shapes["intermediate_size"]
    q, kv = shapes["q_size"], shapes["kv_size"]
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }[projection]


def _checked_pair(
    name: str, key: tuple[int, str], a: torch.Tensor, b: torch.Tensor, rank: int, shapes: AdapterShapes
) -> tuple[torch.Tensor, torch.Tensor]:
    in_features, out_features = _features(key[1], shapes)
    module = module_name(*key)
    checked = []
    for half, tensor, expected in (("A", a, (rank, in_features)), ("B", b, (out_features, rank))):
        if tuple(tensor.shape) != expected:
            raise _error(name, f"{module}.lora_{half} has shape {list(tensor.shape)}, expected "
                               f"{list(expected)} (r={rank}, in_features={in_features}, "
                               f"out_features={out_features})")
        if not tensor.is_floating_point():
            raise _error(name, f"{module}.lora_{half} has dtype {tensor.dtype}, not a floating-point type")
        full = tensor.to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(full).all()):
            raise _error(name, f"{module}.lora_{half} has non-finite values (NaN or inf)")
        checked.append(full)
    return checked[0], checked[1]
