"""Pre-quantized checkpoints in their published formats, written from a 16/32-bit HF folder.

- :func:`write_fp8_checkpoint`: compressed-tensors fp8 (``quant_method: "compressed-tensors"``,
  ``format: "float-quantized"``, ``weight_scale`` per channel ``[N, 1]`` or per tensor ``[1]``,
  dynamic per-token input activations, ``ignore: ["lm_head"]``, as published for Llama 3) or HF
  ``quant_method: "fp8"`` (``weight_scale_inv``, one per tensor, ``modules_to_not_convert``);
  optionally per-layer KV-cache scales (``self_attn.k_scale`` / ``v_scale``). With ``block``:
  one scale per ``[block_n, block_k]`` block (``[ceil(N / bn), ceil(K / bk)]``), HF's
  ``weight_block_size`` as DeepSeek-V3 publishes it (no ``modules_to_not_convert``: the head is
  simply not quantized) or compressed-tensors strategy ``block`` with ``block_structure``.
- :func:`write_awq_checkpoint`: AWQ as AutoAWQ writes it (GEMM format: ``qweight`` int32
  ``[K, N / 8]`` and ``qzeros`` packed along the outputs in AWQ's ``0 2 4 6 1 3 5 7`` order,
  ``scales`` ``[G, N]``), round-to-nearest with zero points (AWQ's scale search left out).
- :func:`write_gptq_checkpoint`: GPTQ as AutoGPTQ/optimum write it (``qweight``/``qzeros``/
  ``scales``/``g_idx``, :func:`autogptq_pack`), round-to-nearest on the GPTQ grid.
- :func:`write_ct_int_checkpoint`: compressed-tensors integer weights as llm-compressor writes its
  W4A16 / W8A16 schemes (``format: "pack-quantized"``: ``weight_packed``, bfloat16
  ``weight_scale``, ``weight_zero_point`` packed along the outputs when asymmetric,
  ``weight_g_idx`` for ``actorder: "group"``, ``weight_shape``), round-to-nearest.

Each writer also returns the weights the quantized checkpoint stands for, dequantized
(float32), and :func:`write_dense_checkpoint` saves them as an ordinary folder: the reference a
test compares the engine with.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_worker.model_executor.layers.quantization.awq_format import dequantize_awq, pack_awq
from gpu_worker.model_executor.layers.quantization.ct_int_format import CtIntConfig, dequantize_ct, pack_ct
from gpu_worker.model_executor.layers.quantization.gptq_format import GptqConfig, dequantize_gptq
from kernels.quant_reference import (
    dequantize_fp8,
    dequantize_fp8_blocks,
    quantize_fp8_blocks,
    quantize_fp8_rows,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _read(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _copy_folder(src: Path, dst: Path, quantization_config: dict[str, Any] | None) -> None:
    """Config (with ``quantization_config``) and tokenizer files of ``src`` into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=1))


def _save(tensors: dict[str, torch.Tensor], dst: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})


def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJECTIONS


def write_dense_checkpoint(src: Path, dst: Path, weights: dict[str, torch.Tensor]) -> Path:
    """``src`` with ``weights`` (float32) in place of its own: a 16/32-bit reference folder."""
    _copy_folder(src, dst, None)
    _save({**_read(src), **weights}, dst)
    return dst


def write_fp8_checkpoint(
    src: Path, dst: Path, *, naming: str = "compressed-tensors", per_channel: bool = True,
    kv_scales: tuple[float, float] | None = None, block: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """An fp8 checkpoint of ``src``'s projections (module docstring); returns the dequantized
    projections (float32, by HF name). ``kv_scales``: ``(k_scale, v_scale)`` of every layer;
    ``block``: block-wise scales (``per_channel`` is then ignored)."""
    tensors = _read(src)
    out: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    num_layers = 0
    for name, t in tensors.items():
        if not _is_projection(name):
            out[name] = t
            continue
        num_layers = max(num_layers, int(name.split(".")[2]) + 1)
        w = t.float()
        base = name[: -len("weight")]
        if block is not None:
            q, scale = quantize_fp8_blocks(w, block)
            out[name] = q
            out[base + ("weight_scale_inv" if naming == "hf" else "weight_scale")] = scale
            dequantized[name] = dequantize_fp8_blocks(q, scale, block)
            continue
        if per_channel:
            q, scale = quantize_fp8_rows(w)  # scale [N, 1]
        else:
            q, scale = quantize_fp8_rows(w.reshape(1, -1))
            q, scale = q.reshape(w.shape), scale.reshape(())
        out[name] = q
        if naming == "compressed-tensors":
            out[base + "weight_scale"] = scale if per_channel else scale.reshape(1)
            out[base + "input_scale"] = torch.ones(1)  # static activation scale: ignored (dynamic)
        else:
            out[base + "weight_scale_inv"] = scale  # per tensor: a 0-d tensor, as transformers writes
        dequantized[name] = dequantize_fp8(q, scale.reshape(-1).expand(w.shape[0]))
    if kv_scales is not None:
        for i in range(num_layers):
            out[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([kv_scales[0]])
            out[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([kv_scales[1]])
    if naming == "compressed-tensors":
        weights = {"type": "float", "num_bits": 8, "strategy": "channel" if per_channel else "tensor",
                   "symmetric": True, "dynamic": False}
        activations = {"type": "float", "num_bits": 8, "strategy": "token", "symmetric": True,
                       "dynamic": True}
        if block is not None:
            weights.update(strategy="block", block_structure=list(block))
            activations.update(strategy="group", group_size=block[1])
        qc: dict[str, Any] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations}},
            "ignore": ["lm_head"],
        }
        if kv_scales is not None:
            qc["kv_cache_scheme"] = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False,
                                     "symmetric": True}
    elif naming == "hf" and block is not None:
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(block)}
    elif naming == "hf":
        if per_channel:
            raise ValueError("HF quant_method fp8 without block sizes has one scale per tensor")
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head"]}
    else:
        raise ValueError(f"naming must be compressed-tensors or hf, got {naming!r}")
    _copy_folder(src, dst, qc)
    _save(out, dst)
    return dequantized


def autogptq_pack(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int,
    v1: bool = True, g_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``QuantLinear.pack`` of AutoGPTQ (what optimum writes): ``weight`` ``[N, K]`` already on
    the grid ``scales * (q - zeros)``; ``scales`` ``[G, N]`` float16, ``zeros`` ``[G, N]`` ints;
    ``g_idx`` the group of each input (default ``k // group_size``; act-order: any order).

    Returns ``(qweight, qzeros, scales, g_idx)``. ``v1``: the ``zeros -= 1`` of the
    ``checkpoint_format: "gptq"`` packer (a zero of 0 becomes -1, i.e. all ones in uint32).
    """
    n, k = weight.shape
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // group_size
    g_idx = g_idx.to(torch.int32)
    scale_zeros = zeros.float() * scales.float()
    g = g_idx.long()
    intweight = torch.round((weight.float() + scale_zeros[g].t()) / scales.float()[g].t()).to(torch.int64)
    intweight_np = intweight.t().contiguous().numpy().astype(np.uint32)  # [K, N]
    per_word = 32 // bits
    qweight = np.zeros((k // per_word, n), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per_word):
            qweight[row] |= intweight_np[row * per_word + j] << np.uint32(bits * j)
    zeros_np = (zeros.to(torch.int64) - (1 if v1 else 0)).numpy().astype(np.uint32)
    qzeros = np.zeros((zeros_np.shape[0], n // per_word), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per_word):
            qzeros[:, col] |= zeros_np[:, col * per_word + j] << np.uint32(bits * j)
    return (torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32)),
            scales.to(torch.float16), g_idx)


def gptq_rtn(weight: torch.Tensor, group_size: int, bits: int, sym: bool) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest on GPTQ's grid (AutoGPTQ's quantizer without the Hessian updates):
    ``(weight on the grid, scales [G, N] float16, zeros [G, N])``."""
    n, k = weight.shape
    maxq = (1 << bits) - 1
    w = weight.float().reshape(n, k // group_size, group_size)
    if sym:
        top = w.abs().amax(-1)
        scales = (2 * top / maxq).clamp_min(1e-6).half()
        zeros = torch.full_like(top, (maxq + 1) // 2, dtype=torch.int64)
    else:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = ((high - low) / maxq).clamp_min(1e-6).half()
        # A zero point of 0 would hit AutoGPTQ's packing quirk (tested on its own elsewhere).
        zeros = torch.round(-low / scales.float()).to(torch.int64).clamp(1, maxq)
    q = torch.clamp(torch.round(w / scales.float()[..., None]) + zeros[..., None], 0, maxq)
    on_grid = (scales.float()[..., None] * (q - zeros[..., None])).reshape(n, k)
    return on_grid, scales.t().contiguous(), zeros.t().contiguous()


def act_order_perm(name: str, k: int) -> torch.Tensor:
    """A stand-in for GPTQ's decreasing-activation order of the inputs of projection ``name``:
    one random order per input of a decoder layer (q/k/v share theirs, as gate/up do: GPTQ takes
    it from the Hessian of the layer input), seeded by that input's name."""
    layer, proj = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    key = f"{layer.rsplit('.', 1)[0]}.{shared.get(proj, proj)}"
    return torch.randperm(k, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))


def _projections(src: Path, out: dict[str, torch.Tensor], lm_head: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """``src``'s projection weights (name, tensor; with ``lm_head`` its untied head too), the
    other tensors copied into ``out``."""
    for name, t in _read(src).items():
        if _is_projection(name) or (lm_head and name == "lm_head.weight"):
            yield name, t
        else:
            out[name] = t


def write_awq_checkpoint(src: Path, dst: Path, *, group_size: int = 32) -> dict[str, torch.Tensor]:
    """An AWQ checkpoint (AutoAWQ GEMM format, module docstring) of ``src``'s projections; returns
    their dequantized weights (float32, by HF name, AWQ's own formula)."""
    out: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, t in _projections(src, out):
        on_grid, scales, zeros = gptq_rtn(t, group_size, 4, sym=False)  # scales, zeros [G, N]
        g = torch.arange(t.shape[1]) // group_size
        q = torch.round(on_grid / scales.float().t()[:, g]).to(torch.int64) + zeros.t()[:, g]  # [N, K]
        qweight, qzeros = pack_awq(q.t().contiguous()), pack_awq(zeros)
        base = name[: -len("weight")]
        out.update({base + "qweight": qweight, base + "qzeros": qzeros, base + "scales": scales})
        dequantized[name] = dequantize_awq(qweight, qzeros, scales, group_size)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}
    _copy_folder(src, dst, qc)
    _save(out, dst)
    return dequantized


def write_ct_int_checkpoint(
    src: Path, dst: Path, *, bits: int = 4, group_size: int = 32, symmetric: bool = True,
    actorder: str | None = None, lm_head: bool = False,
) -> dict[str, torch.Tensor]:
    """A compressed-tensors ``pack-quantized`` checkpoint of ``src``'s projections (module
    docstring; ``group_size`` -1: strategy channel); returns their dequantized weights (float32,
    by HF name, compressed-tensors' formula). ``actorder="group"``: each group a random set of
    inputs (:func:`act_order_perm`) named by ``weight_g_idx``. ``lm_head``: the head is quantized
    too (an empty ``ignore`` list, as a recipe that targets every Linear writes it)."""
    config = CtIntConfig(bits=bits, group_size=group_size, symmetric=symmetric, actorder=actorder)
    half = 1 << (bits - 1)
    out: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, t in _projections(src, out, lm_head):
        n, k = t.shape
        group = k if group_size == -1 else group_size
        g_idx = torch.arange(k) // group
        if actorder == "group":  # input perm[i] is in group i // group
            scattered = torch.empty_like(g_idx)
            scattered[act_order_perm(name, k)] = g_idx
            g_idx = scattered
        w = t.float()
        low = torch.stack([w[:, g_idx == g].amin(1) for g in range(k // group)], 1).clamp(max=0)  # [N, G]
        high = torch.stack([w[:, g_idx == g].amax(1) for g in range(k // group)], 1).clamp(min=0)
        if symmetric:
            scales = (torch.maximum(-low, high) / (half - 1)).clamp_min(1e-6).to(torch.bfloat16)
            zeros = torch.zeros_like(low, dtype=torch.int64)
        else:
            scales = ((high - low) / (2 * half - 1)).clamp_min(1e-6).to(torch.bfloat16)
            zeros = (torch.round(-low / scales.float()) - half).to(torch.int64).clamp(-half, half - 1)
        q = (torch.round(w / scales.float()[:, g_idx]) + zeros[:, g_idx]).clamp(-half, half - 1)
        base = name[: -len("weight")]
        tensors = {"weight_packed": pack_ct(q.to(torch.int64) + half, bits), "weight_scale": scales,
                   "weight_shape": torch.tensor([n, k], dtype=torch.int32)}
        if not symmetric:
            tensors["weight_zero_point"] = pack_ct(zeros + half, bits, dim=0)
        if actorder == "group":
            tensors["weight_g_idx"] = g_idx.to(torch.int32)
        out.update({base + key: v for key, v in tensors.items()})
        dequantized[name] = dequantize_ct(tensors["weight_packed"], scales, tensors.get("weight_zero_point"),
                                          tensors.get("weight_g_idx"), config)
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size, "dynamic": False,
               "actorder": actorder, "observer": "minmax"}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "ignore": [] if lm_head else ["lm_head"], "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                        "input_activations": None, "output_activations": None}}}
    _copy_folder(src, dst, qc)
    _save(out, dst)
    return dequantized


def write_gptq_checkpoint(
    src: Path, dst: Path, *, bits: int = 4, group_size: int = 32, sym: bool = True, lm_head: bool = False,
    desc_act: bool = False,
) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint (``checkpoint_format: "gptq"``) of ``src``'s projections (and its LM
    head with ``lm_head``, as GPTQModel's ``lm_head=True`` writes it: ``lm_head.qweight`` ...,
    ``"lm_head": true`` in the config); returns their dequantized weights (float32, by HF name,
    the GPTQ formula). ``desc_act``: act-order, each group a random set of inputs
    (:func:`act_order_perm`) named by ``g_idx``, as GPTQ's ``desc_act=True`` writes them."""
    tensors = _read(src)
    if lm_head and "lm_head.weight" not in tensors:
        raise ValueError(f"{src} ties its LM head to the embedding: there is no head to quantize")
    out: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    config = GptqConfig(bits=bits, group_size=group_size, sym=sym)
    for name, t in tensors.items():
        if not (_is_projection(name) or (lm_head and name == "lm_head.weight")):
            out[name] = t
            continue
        k = t.shape[1]
        if desc_act:  # groups of consecutive inputs in the layer's order: perm[g * gs:(g + 1) * gs]
            perm = act_order_perm(name, k)
            in_order, scales, zeros = gptq_rtn(t[:, perm], group_size, bits, sym)
            on_grid = torch.empty_like(in_order)
            on_grid[:, perm] = in_order
            groups = torch.empty(k, dtype=torch.int32)
            groups[perm] = torch.arange(k, dtype=torch.int32) // group_size
        else:
            (on_grid, scales, zeros), groups = gptq_rtn(t, group_size, bits, sym), None
        qweight, qzeros, scales16, g_idx = autogptq_pack(on_grid, scales, zeros, group_size, bits,
                                                         g_idx=groups)
        base = name[: -len("weight")]
        out.update({base + "qweight": qweight, base + "qzeros": qzeros, base + "scales": scales16,
                    base + "g_idx": g_idx})
        dequantized[name] = dequantize_gptq(qweight, qzeros, scales16, g_idx, config)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
          "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True, "lm_head": lm_head}
    _copy_folder(src, dst, qc)
    _save(out, dst)
    return dequantized
