r"""A GGUF file's tensors under HF names, read directly (``gguf.GGUFReader``): the quantized path.

:func:`iter_gguf` yields ``(HF name, GgufTensorSource)`` like
:func:`~gpu_worker.model_executor.weights.iter_safetensors`, so the models load a GGUF through
the same ``load_weights``. A :class:`GgufTensorSource` is what the 4-bit linear method
(``layers/quantization/wna16.py``) repacks into the WnA16 layout (:meth:`GgufTensorSource.wna16`,
exact, numpy); every other reader (norms, the embedding, the LM head, types with no exact WnA16
form) gets dense float32 values through ``narrow``/``full``, dequantizing only the rows asked
for. Llama-architecture files store Q and K with rows permuted for llama.cpp's rotary layout:
the source presents them in HF's order (``llama_qk_row_order``), as transformers' loader does.

The ``gguf`` package is imported here only, lazily: non-GGUF models never need it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_worker.model_executor.layers.quantization.gguf_format import (
    DENSE_TYPES,
    WNA16_TYPES,
    dequantize_gguf,
    gguf_to_wna16,
    llama_qk_row_order,
)
from gpu_worker.model_executor.weights import TensorSource
from kernels.quant_reference import WnA16Weight, dequantize_wna16

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a llama-family GGUF tensor (None: not a model parameter, e.g.
    ``rope_freqs``, whose values our rotary embedding computes from the config)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_PARTS:
        return None
    return f"model.layers.{match.group(1)}.{_LAYER_PARTS[match.group(2)]}.{match.group(3)}"


class GgufTensorSource(TensorSource):
    """One GGUF tensor as an HF-layout tensor (``[out, in]`` for weights).

    ``data``: the reader's array (uint8 ``[rows, bytes per row]`` for block-quantized types,
    float ``[rows, cols]`` or ``[cols]`` for dense ones); ``row_order``: HF row ``i`` is stored
    row ``row_order[i]`` (llama's Q/K), or None."""

    def __init__(
        self, name: str, data: np.ndarray, qtype: str, shape: tuple[int, ...], row_order: torch.Tensor | None
    ) -> None:
        super().__init__(shape, self._read)
        self.name = name
        self.qtype = qtype
        self._data = data
        self._row_order = row_order

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in DENSE_TYPES

    def wna16(self) -> WnA16Weight | None:
        """The tensor repacked exactly into the WnA16 layout (None for dense types and for
        quantized types with no exact WnA16 form, which load dense)."""
        if self.qtype not in WNA16_TYPES:
            return None
        weight = gguf_to_wna16(self._data, self.qtype)
        return weight if self._row_order is None else weight.select_rows(self._row_order)

    def _rows(self, rows: slice) -> np.ndarray:
        if self._row_order is None:
            return self._data[rows]
        return self._data[self._row_order[rows].numpy()]

    def _read(self, index: tuple[slice, ...]) -> torch.Tensor:
        rows = index[0] if index else slice(None)
        data = self._rows(rows) if len(self.shape) > 1 else self._data
        if self.qtype in WNA16_TYPES:
            w = gguf_to_wna16(np.ascontiguousarray(data), self.qtype)
            dense = dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
        else:
            dense = dequantize_gguf(np.ascontiguousarray(data), self.qtype)
            if len(self.shape) > 1:
                dense = dense.reshape(-1, self.shape[1])
        if len(self.shape) == 1:
            return dense.reshape(-1)[index[0] if index else slice(None)]
        return dense[(slice(None), *index[1:])]


def iter_gguf(gguf_file: Path, hf_config: Any) -> Iterator[tuple[str, TensorSource]]:
    """``(HF name, source)`` for every model tensor of ``gguf_file`` (llama-family layouts:
    Llama, Mistral, Qwen2, Qwen3)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    arch_field = reader.fields["general.architecture"]
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", heads))
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        qtype = tensor.tensor_type.name
        shape = tuple(int(d) for d in reversed(list(tensor.shape)))  # GGUF lists dims innermost first
        order = None
        if architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            order = llama_qk_row_order(shape[0], heads if ".q_proj." in name else kv_heads)
        yield name, GgufTensorSource(tensor.name, np.asarray(tensor.data), qtype, shape, order)
