"""GGUF -> HF folder conversion, cached on disk.

transformers reads a GGUF's config and tokenizer (``gguf_file=``) and dequantizes its
tensors into HF names (its GGUF checkpoint loader). That takes seconds, so the result is
written once as an ordinary HF folder (config.json, model.safetensors, tokenizer files)
under ``$LLMSERVE_CACHE_DIR`` (default ``~/.cache/llmserve``), keyed by the file's path,
size and mtime, and loaded from there afterwards. A GGUF served quantized needs only the
config and tokenizer (its tensors are read from the file itself, ``gguf_weights.py``):
``convert_gguf(path, weights=False)`` writes those alone, into a sibling folder (or reuses a
complete one). ``gguf`` is imported only here, lazily.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

_COMPLETE_MARKER = "model.safetensors"
_METADATA_MARKER = "config.json"


def cache_root() -> Path:
    """``$LLMSERVE_CACHE_DIR`` or ``~/.cache/llmserve``."""
    return Path(os.environ.get("LLMSERVE_CACHE_DIR") or Path.home() / ".cache" / "llmserve")


def cache_dir_for(gguf_file: Path) -> Path:
    """Where the converted folder of ``gguf_file`` lives (changes when the file changes)."""
    path = gguf_file.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def convert_gguf(gguf_file: Path, weights: bool = True) -> Path:
    """The cached HF folder for ``gguf_file``, converting it first on a cache miss; with
    ``weights=False`` a folder with at least its config and tokenizer."""
    full = cache_dir_for(gguf_file)
    if (full / _COMPLETE_MARKER).is_file():
        return full
    target, marker = (full, _COMPLETE_MARKER)
    if not weights:
        target, marker = full.with_name(full.name + "-meta"), _METADATA_MARKER
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename: readers never see a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        _write_hf_folder(gguf_file.resolve(), tmp, weights)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_folder(gguf_file: Path, out: Path, weights: bool = True) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    fill_architectures(config)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if not weights:
        tokenizer.save_pretrained(out)
        config.save_pretrained(out)  # config.json last: it marks the folder complete
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # only for HF tensor names
    tensors = _read_gguf_tensors(gguf_file, skeleton)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt", "source": str(gguf_file)},
    )


def _read_gguf_tensors(gguf_file: Path, skeleton: Any) -> dict[str, torch.Tensor]:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton)
    tensors: dict[str, torch.Tensor] = parsed["tensors"]
    return tensors


def fill_architectures(config: Any) -> None:
    """GGUF configs carry no ``architectures``: derive it from ``model_type``."""
    if getattr(config, "architectures", None):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name:
        config.architectures = [name]
