"""The LLaVA model: its config read flattened, both checkpoint layouts loading to the same
parameters, and our CLIP tower + projector equal to HF's image features."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpu_worker.config import EngineConfig
from gpu_worker.model_executor import loader
from gpu_worker.model_executor.models.clip import hidden_state_indices


def _load(folder: Path) -> torch.nn.Module:
    source = loader.resolve_model(str(folder))
    return loader.load_model(EngineConfig(model=str(folder)), torch.device("cpu"), torch.float32,
                             source=source)


def test_the_config_is_read_as_its_text_config(tiny_model: Callable[[str], Path]) -> None:
    config = loader.load_hf_config(loader.resolve_model(str(tiny_model("llava"))))
    assert config.architectures == ["LlavaForConditionalGeneration"]
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 64, 49153)
    assert config.multimodal_config.vision_config.image_size == 32
    assert config.tie_word_embeddings is False
    plain = loader.load_hf_config(loader.resolve_model(str(tiny_model("llama"))))
    assert not hasattr(plain, "multimodal_config") and plain.architectures == ["LlamaForCausalLM"]


def test_image_features_equal_hf(tiny_model: Callable[[str], Path]) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    folder = tiny_model("llava")
    ours = _load(folder)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                for h, w in ((48, 40), (32, 90))]
    pixels = AutoImageProcessor.from_pretrained(folder)(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        got = ours.embed_images(pixels)
        want = hf.get_image_features(pixel_values=pixels).pooler_output
    assert got.shape == (2, 16, 64)
    torch.testing.assert_close(got, torch.stack(list(want)).reshape(got.shape), rtol=1e-5, atol=1e-5)


def test_both_checkpoint_layouts_load_the_same_parameters(tiny_model: Callable[[str], Path],
                                                          tmp_path: Path) -> None:
    """transformers 5 writes ``vision_tower.*``; llava-hf's published files say
    ``vision_tower.vision_model.*``; transformers 5's modules are ``model.language_model.*``."""
    from safetensors.torch import load_file, save_file

    folder = tiny_model("llava")
    tensors = load_file(str(folder / "model.safetensors"))
    renames = {"published": lambda n: n.replace("vision_tower.", "vision_tower.vision_model.", 1),
               "modules": lambda n: ("model." + n.replace("language_model.model.", "language_model.", 1)
                                     if not n.startswith("language_model.lm_head") else "lm_head.weight")}
    reference = dict(_load(folder).named_parameters())
    for layout, rename in renames.items():
        other = tmp_path / layout
        shutil.copytree(folder, other)
        save_file({rename(n): t for n, t in tensors.items()}, str(other / "model.safetensors"))
        loaded = dict(_load(other).named_parameters())
        assert loaded.keys() == reference.keys(), layout
        for name, param in loaded.items():
            assert torch.equal(param, reference[name]), (layout, name)


@pytest.mark.parametrize("layer,want", [(-2, [3]), (-1, [4]), (0, [0]), ([-2, -5], [3, 0])])
def test_feature_layers_count_like_hf_hidden_states(layer: Any, want: list[int]) -> None:
    assert hidden_state_indices(layer, 4) == want
    with pytest.raises(ValueError, match="vision_feature_layer"):
        hidden_state_indices(-6, 4)


def test_unserved_llava_variants_are_refused(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    import json

    folder = tmp_path / "siglip"
    shutil.copytree(tiny_model("llava"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["model_type"] = "siglip_vision_model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'siglip_vision_model' vision tower is not served"):
        loader.load_hf_config(loader.resolve_model(str(folder)))
