"""Tiny random HF models saved with ``save_pretrained``, one per family we serve.

Tests use the session fixtures of ``tests/conftest.py`` (``tiny_model(family)``, built once per
family and shared by every area); direct use, as in the benchmarks::

    tok_dir = save_smollm2_tokenizer(tmp / "tok", smollm2_gguf)   # once per session (~4 s)
    model_dir = make_tiny_model("qwen3", tmp / "qwen3", tokenizer_dir=tok_dir)

Every model has 2 layers, hidden 64, 4 query heads / 2 KV heads and the SmolLM2 vocabulary
(49152), and a copy of the tokenizer next to it. Weights use ``initializer_range=0.1``, biases
and norm scales are randomized too (so loading them is tested), which keeps greedy argmax
margins far above float32 noise.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

VOCAB_SIZE = 49152
EOS_TOKEN_ID = 2  # SmolLM2's <|im_end|>

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=EOS_TOKEN_ID,
)


def _llama(**extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**_COMMON, **extra})


def _config_llama() -> Any:
    # llama3 rope scaling with a short original length, so the scaled band is really exercised.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return _llama(rope_parameters=rope, tie_word_embeddings=False)


def _config_llama_tied() -> Any:
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    return _llama(rope_parameters=rope, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)


def _config_mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**{**_COMMON, "head_dim": 32, "sliding_window": None, "tie_word_embeddings": False})


def _config_qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**{**_COMMON, "tie_word_embeddings": True, "use_sliding_window": False})


def _config_qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        **{**_COMMON, "head_dim": 32, "tie_word_embeddings": False, "use_sliding_window": False}
    )


def _config_mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**{**_COMMON, "head_dim": 16, "sliding_window": None, "tie_word_embeddings": False,
                            "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64})


def _config_qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig

    # layer 1 dense (mlp_only_layers), layers 0 and 2 sparse: 8 experts, top 2 renormalized
    return Qwen3MoeConfig(**{**_COMMON, "num_hidden_layers": 3, "head_dim": 16, "tie_word_embeddings": False,
                             "use_sliding_window": False, "num_experts": 8, "num_experts_per_tok": 2,
                             "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": [1],
                             "norm_topk_prob": True})


def _config_qwen2_moe() -> Any:
    from transformers import Qwen2MoeConfig

    # layer 0 dense, layer 1 sparse (decoder_sparse_step 2) with a shared expert; top 2 not renormalized
    return Qwen2MoeConfig(**{**_COMMON, "tie_word_embeddings": False, "use_sliding_window": False,
                             "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                             "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2,
                             "norm_topk_prob": False})


# family -> config builder; "llama" uses llama3 rope scaling, "llama_tied" linear scaling + biases.
FAMILIES: MappingProxyType[str, Callable[[], Any]] = MappingProxyType(
    {
        "llama": _config_llama,
        "llama_tied": _config_llama_tied,
        "mistral": _config_mistral,
        "qwen2": _config_qwen2,
        "qwen3": _config_qwen3,
    }
)
# The mixture-of-experts families, apart (the dense tests iterate FAMILIES); their routers are
# randomized when built (HF initializes Qwen's at zero).
MOE_FAMILIES: MappingProxyType[str, Callable[[], Any]] = MappingProxyType(
    {
        "mixtral": _config_mixtral,
        "qwen3_moe": _config_qwen3_moe,
        "qwen2_moe": _config_qwen2_moe,
    }
)


def load_smollm2_tokenizer(gguf_file: Path) -> Any:
    """The SmolLM2 tokenizer (byte-level BPE), converted by transformers from its GGUF (~4 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def save_smollm2_tokenizer(dst: Path, gguf_file: Path) -> Path:
    """Convert the SmolLM2 tokenizer from its GGUF and save it into ``dst`` (do it once per session)."""
    tokenizer = load_smollm2_tokenizer(gguf_file)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dst)
    return dst


def make_tiny_config(family: str) -> Any:
    """The HF config of one tiny family (see :data:`FAMILIES` and :data:`MOE_FAMILIES`)."""
    builder = FAMILIES.get(family) or MOE_FAMILIES.get(family)
    if builder is None:
        raise ValueError(f"unknown family {family!r}; known: {[*FAMILIES, *MOE_FAMILIES]}")
    return builder()


def _randomize(model: Any, weights_of: tuple[str, ...] = ()) -> None:
    """Biases N(0, 0.1) and norm scales N(1, 0.1) (so loading them is tested), and the weights of
    the modules named in ``weights_of`` N(0, 0.1) (a vision tower's init is too small to matter)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
            elif any(part in name for part in weights_of):
                param.normal_(0.0, 0.1)


def make_tiny_model(
    family: str,
    dst: Path,
    *,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    **shape: Any,
) -> Path:
    """Build a random model of ``family``, ``save_pretrained`` it (safetensors) into ``dst``.

    ``tokenizer_dir``: a saved tokenizer whose files are copied next to the model.
    ``max_shard_size`` (e.g. ``"1MB"``) writes a sharded checkpoint with its index json.
    ``shape``: config fields to change (``hidden_size=512``, ...) for a larger model.
    """
    if family == "llava":
        return make_tiny_llava(dst, tokenizer_dir=tokenizer_dir, seed=seed)
    from transformers import AutoModelForCausalLM

    config = make_tiny_config(family)
    for name, value in shape.items():
        setattr(config, name, value)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model, ("gate.weight",) if family in MOE_FAMILIES else ())
    dst.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(dst, **kwargs)
    if tokenizer_dir is not None:
        for file in Path(tokenizer_dir).iterdir():
            if file.is_file():
                shutil.copy(file, dst / file.name)
    return dst


IMAGE_TOKEN_ID = VOCAB_SIZE  # "<image>", added to the SmolLM2 vocabulary by make_tiny_llava
# ChatML as SmolLM2's, with content parts: {"type": "image"} -> "<image>", {"type": "text"} -> its text.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_llava(dst: Path, *, tokenizer_dir: Path | None, seed: int = 0) -> Path:
    """A tiny random LLaVA-1.5: a 2-layer CLIP vision tower (32 px images, 8 px patches: 16 image
    tokens), a gelu projector and a Llama text model like the other tiny models, with the SmolLM2
    tokenizer plus ``<image>`` (id :data:`IMAGE_TOKEN_ID`), a chat template that renders image
    parts, and HF's CLIP image processor and LLaVA processor saved beside it."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if tokenizer_dir is None:
        raise ValueError("make_tiny_llava needs the SmolLM2 tokenizer_dir")
    text = _llama(vocab_size=VOCAB_SIZE + 1, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, projection_dim=32, initializer_range=0.1)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=16,
                         tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32)
        _randomize(model, weights_of=("vision_tower", "multi_modal_projector"))
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.convert_tokens_to_ids("<image>") != IMAGE_TOKEN_ID:
        raise RuntimeError("<image> did not get the id after the SmolLM2 vocabulary")
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst
