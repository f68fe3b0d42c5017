"""Which quantization serves a model, and the linear method of each layer (docs/QUANTIZATION.md).

``EngineConfig.quantization`` (``--quantization``):

- ``auto`` (default): what the checkpoint is. A ``quantization_config`` with ``quant_method``
  ``fp8`` or ``compressed-tensors`` with fp8 weights -> ``fp8``; ``compressed-tensors`` with
  integer weights (``pack-quantized``: W4A16, W8A16) -> ``compressed-tensors``; ``gptq`` ->
  ``gptq``; ``awq`` -> ``awq``. A ``.gguf`` file -> ``gguf`` (served quantized) on CUDA,
  ``none`` (the dequantized cache) on the CPU, where a dequantizing matmul per step is slower
  than 32-bit weights.
  Otherwise ``none``.
- ``none``: 16/32-bit weights (a ``.gguf`` through its dequantized cache).
- ``fp8``: fp8 weights; a 16/32-bit checkpoint (or a ``.gguf``'s dequantized cache) is quantized
  as it loads (per output channel), a pre-quantized fp8 checkpoint loads as it is (per tensor,
  per channel, or per block: ``Fp8BlockLinearMethod``).
- ``gptq``: a GPTQ checkpoint, or random 4-bit weights with ``load_format="dummy"``.
- ``awq``: an AWQ checkpoint (AutoAWQ's GEMM format), in the same 4-bit layers as GPTQ.
- ``compressed-tensors``: a compressed-tensors checkpoint as it is (vLLM's name for the format):
  integer weights in the GPTQ layers, fp8 weights as ``fp8``.
- ``gguf``: a ``.gguf`` file served quantized (also on the CPU).

The embeddings stay 16-bit whatever the choice (a lookup), and so does a head tied to them. An
untied LM head is quantized only where the checkpoint stores it so, as vLLM serves them: a GPTQ
checkpoint with ``lm_head: true``, a compressed-tensors integer one whose ``ignore`` list does not
name ``lm_head``, and a GGUF file's ``output.weight`` (4-bit layers read it in
its own type: Q6_K in the common Q4_K_M files, dense 16-bit for types with no WnA16 form). fp8
heads stay 16-bit (compressed-tensors and HF fp8 checkpoints leave ``lm_head`` out), and so does
the head of random 4-bit weights unless the config's ``quantization_config`` says ``lm_head:
true``. The KV cache dtype is the KV pool's (``kv_cache_dtype``), independent of the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gpu_worker.config import KV_CACHE_DTYPES, QUANTIZATIONS
from gpu_worker.model_executor.layers.quantization.awq_format import AwqConfig
from gpu_worker.model_executor.layers.quantization.base import LinearMethod, UnquantizedLinearMethod
from gpu_worker.model_executor.layers.quantization.ct_int_format import CtIntConfig, is_ct_int
from gpu_worker.model_executor.layers.quantization.fp8 import Fp8LinearMethod
from gpu_worker.model_executor.layers.quantization.fp8_block import Fp8BlockLinearMethod
from gpu_worker.model_executor.layers.quantization.fp8_format import parse_fp8_checkpoint, require_fp8
from gpu_worker.model_executor.layers.quantization.gptq_format import GptqConfig
from gpu_worker.model_executor.layers.quantization.wna16 import WnA16LinearMethod
from kernels import KernelOps, get_ops
from kernels.quant_reference import FP8_DTYPE

# HF module names inside our fused layers (a checkpoint's ignore list names the former).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def quantization_config(hf_config: Any) -> Mapping[str, Any] | None:
    """The HF ``quantization_config`` of a model config, as a mapping (None when absent)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return qc


def checkpoint_quantization(hf_config: Any) -> str | None:
    """``fp8`` / ``gptq`` / ``awq`` / ``compressed-tensors`` (integer weights) for a
    pre-quantized checkpoint we serve, None for a 16/32-bit one; ValueError for quantized
    formats we do not."""
    qc = quantization_config(hf_config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors" and is_ct_int(qc):
        CtIntConfig.from_hf(qc)  # raises for schemes we do not serve, naming them
        return "compressed-tensors"
    if method in ("fp8", "compressed-tensors"):
        parse_fp8_checkpoint(qc)  # raises for non-fp8 compressed-tensors and blocks we cannot tile
        return "fp8"
    if method == "gptq":
        GptqConfig.from_hf(qc)
        return "gptq"
    if method == "awq":
        AwqConfig.from_hf(qc)
        return "awq"
    raise ValueError(f"checkpoint quantization {method!r} is not supported "
                     "(fp8, compressed-tensors fp8 / W4A16 / W8A16, gptq, awq)")


def is_gguf(model: str | Path) -> bool:
    return str(model).endswith(".gguf")


def serves_gguf_quantized(requested: str, gguf_file: Path | None, device: torch.device) -> bool:
    """Whether a ``.gguf`` model is read directly into 4-bit layers (else: the dequantized cache)."""
    if gguf_file is None:
        return False
    return requested == "gguf" or (requested == "auto" and device.type == "cuda")


def resolve_quantization(
    requested: str, hf_config: Any, *, gguf_file: Path | None, gguf_quantized: bool, load_format: str
) -> str:
    """The concrete quantization (``none``, ``fp8``, ``gptq``, ``awq``, ``compressed-tensors``,
    ``gguf``) for a request (module docstring); ValueError where the model cannot be served that
    way."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {requested!r}")
    if gguf_quantized:
        return "gguf"
    if requested == "gguf":
        raise ValueError("quantization 'gguf' serves a .gguf file; the model is not one")
    pre_quantized = gguf_file is None and load_format != "dummy"
    checkpoint = checkpoint_quantization(hf_config) if pre_quantized else None
    if checkpoint is not None:
        qc = quantization_config(hf_config) or {}
        if requested == "compressed-tensors" and qc.get("quant_method") == "compressed-tensors":
            return checkpoint  # vLLM's name for every compressed-tensors checkpoint, fp8 ones too
        if requested not in ("auto", checkpoint):
            raise ValueError(f"the checkpoint is {checkpoint}-quantized: serve it with quantization "
                             f"'auto' or '{checkpoint}', not {requested!r}")
        return checkpoint
    if requested == "gptq" and load_format != "dummy":
        raise ValueError("quantization 'gptq' needs a GPTQ checkpoint (quantization_config quant_method "
                         "'gptq'), or load_format='dummy' for random 4-bit weights")
    if requested in ("awq", "compressed-tensors"):
        raise ValueError(f"quantization {requested!r} needs a checkpoint in that format (quantization_config "
                         f"quant_method {requested!r}); random 4-bit weights are quantization 'gptq' with "
                         "load_format='dummy'")
    return "none" if requested == "auto" else requested


def bytes_per_weight(quantization: str, element_size: int, hf_config: Any = None) -> float:
    """Bytes per weight of a linear layer as served, for sizing ahead of loading: the integer
    formats' bits (8 where ``hf_config``'s GPTQ / compressed-tensors ``quantization_config``
    says so, else 4) plus a float16 scale per group of 32 (an upper bound for groups of 128)."""
    if quantization == "fp8":
        return 1.0
    if quantization not in ("gptq", "awq", "compressed-tensors", "gguf"):
        return float(element_size)
    qc = (quantization_config(hf_config) if hf_config is not None else None) or {}
    bits = 4  # a dummy load's random weights, AWQ, GGUF
    if qc.get("quant_method") == "gptq" and quantization == "gptq":
        bits = GptqConfig.from_hf(qc).bits
    elif qc.get("quant_method") == "compressed-tensors" and quantization == "compressed-tensors":
        bits = CtIntConfig.from_hf(qc).bits
    return bits / 8 + 2 / 32


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV pool's element type: the model's (``auto``) or e4m3 (``fp8``, refused on CUDA
    devices without fp8 conversions)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype != "fp8":
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if device.type == "cuda":
        require_fp8(device)
    return FP8_DTYPE


def make_linear_methods(
    quantization: str, hf_config: Any, device: torch.device, ops: KernelOps | None = None
) -> Callable[[str], LinearMethod]:
    """The linear method of each layer, by its parameter prefix (``model.layers.3.mlp.down_proj``):
    the quantized one, except modules a checkpoint leaves unquantized and the LM head where the
    checkpoint stores it in 16 bits (module docstring). ``embed_tokens`` asks for the method of a
    head tied to the embedding: always the 16-bit one. ``ops``: the kernels (default:
    ``get_ops(device)``)."""
    ops = ops or get_ops(device)
    plain = UnquantizedLinearMethod.for_ops(ops, device)
    if quantization == "none":
        return lambda prefix: plain
    qc = quantization_config(hf_config)
    ignore: tuple[str, ...] = ()
    method: LinearMethod
    head_quantized = False
    if quantization == "fp8":
        if device.type == "cuda":
            require_fp8(device)
        fmt = parse_fp8_checkpoint(qc) if qc is not None else None
        ignore = fmt.ignore if fmt is not None else ()
        if fmt is not None and fmt.block:
            method = Fp8BlockLinearMethod(ops, fmt)
        else:
            method = Fp8LinearMethod(ops, fmt)
    elif quantization == "gptq":
        gptq = GptqConfig.from_hf(qc) if qc is not None else None
        method = WnA16LinearMethod(ops, device, gptq)
        head_quantized = gptq is not None and gptq.lm_head
    elif quantization in ("awq", "compressed-tensors"):
        if qc is None:
            raise ValueError(f"quantization {quantization!r} needs the checkpoint's quantization_config")
        if quantization == "awq":
            awq = AwqConfig.from_hf(qc)
            ignore, method = awq.ignore, WnA16LinearMethod(ops, device, awq=awq)
        else:
            ct = CtIntConfig.from_hf(qc)
            ignore, method = ct.ignore, WnA16LinearMethod(ops, device, ct=ct)
            # A recipe that targets every Linear and does not ignore the head stores it quantized.
            head_quantized = not any(_matches("lm_head", rule) for rule in ignore)
    elif quantization == "gguf":
        method = WnA16LinearMethod(ops, device)
        head_quantized = True  # output.weight in the file's type (dense types load dense)
    else:
        raise ValueError(f"unknown quantization {quantization!r}")

    def pick(prefix: str) -> LinearMethod:
        if prefix == "embed_tokens" or _ignored(prefix, ignore):
            return plain
        if prefix == "lm_head":
            return method if head_quantized else plain
        return method

    return pick


def _ignored(prefix: str, ignore: tuple[str, ...]) -> bool:
    """Whether a checkpoint's ignore list (names, or ``re:`` patterns, of HF modules) leaves
    our layer ``prefix`` unquantized; a fused layer must be ignored whole or not at all."""
    if not ignore:
        return False
    head, _, last = prefix.rpartition(".")
    names = [f"{head}.{part}" for part in _FUSED[last]] if last in _FUSED else [prefix]
    hits = [any(_matches(name, rule) for rule in ignore) for name in names]
    if any(hits) and not all(hits):
        raise ValueError(f"the checkpoint leaves only some of {names} unquantized; "
                         "they are one fused layer here")
    return all(hits)


def _matches(name: str, rule: str) -> bool:
    """compressed-tensors' ``re:<pattern>`` (full match), or a module name (a full name, or a
    trailing part such as ``lm_head`` / ``mlp.down_proj`` as HF's ``modules_to_not_convert``)."""
    if rule.startswith("re:"):
        return re.fullmatch(rule[3:], name) is not None
    return name == rule or name.endswith("." + rule)
