"""PEFT adapters: written by the test helper, read back by ``load_adapter``, refused when they
use what we do not serve; the merged HF reference of ``tests/helpers/lora_adapters.py``."""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from gpu_worker.lora.adapter import PROJECTIONS, LoraAdapter, adapter_shapes_of, load_adapter
from tests.helpers.lora_adapters import merged_model, write_random_adapter
from tests.helpers.torch_threads import _one_torch_thread  # noqa: F401 - autouse fixture

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _load(model_dir: Path, adapter_dir: Path, *, max_rank: int = 16, **shape: int) -> LoraAdapter:
    shapes = {**adapter_shapes_of(AutoConfig.from_pretrained(model_dir)), **shape}
    return load_adapter("ad", adapter_dir, **shapes, max_rank=max_rank)


def _edit_config(adapter_dir: Path, **fields: Any) -> None:
    config = json.loads((adapter_dir / CONFIG).read_text())
    (adapter_dir / CONFIG).write_text(json.dumps({**config, **fields}))


def _edit_tensors(adapter_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(adapter_dir / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(adapter_dir / WEIGHTS))


@pytest.mark.parametrize(("family", "use_rslora"), [("llama", False), ("qwen3", True)])
def test_adapter_loads_back_exactly(
    tiny_model: Callable[[str], Path], tmp_path: Path, family: str, use_rslora: bool
) -> None:
    model_dir = tiny_model(family)
    adapter_dir = write_random_adapter(model_dir, tmp_path / "ad", rank=8, alpha=16.0, use_rslora=use_rslora)
    adapter = _load(model_dir, adapter_dir)

    assert adapter.name == "ad" and adapter.path == str(adapter_dir) and adapter.rank == 8
    assert adapter.scaling == pytest.approx(16.0 / math.sqrt(8) if use_rslora else 2.0)
    assert adapter.target_projections == PROJECTIONS and adapter.target_layers == (0, 1)
    saved = load_file(str(adapter_dir / WEIGHTS))
    assert len(adapter.weights) == 2 * len(PROJECTIONS) and 2 * len(adapter.weights) == len(saved)
    for (layer, projection), (a, b) in adapter.weights.items():
        parent = "self_attn" if projection in PROJECTIONS[:4] else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{parent}.{projection}"
        assert a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"
        assert torch.equal(a, saved[f"{prefix}.lora_A.weight"])
        assert torch.equal(b, saved[f"{prefix}.lora_B.weight"])
    # qwen3: head_dim 32 > hidden / heads, so q_proj is wider than the hidden size.
    q_out = 4 * (32 if family == "qwen3" else 16)
    assert adapter.weights[(0, "q_proj")][1].shape == (q_out, 8)
    assert adapter.weights[(0, "o_proj")][0].shape == (8, q_out)


def test_subset_of_layers_and_targets(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    adapter_dir = write_random_adapter(model_dir, tmp_path / "ad", targets=("v_proj", "q_proj"), layers=[1])
    adapter = _load(model_dir, adapter_dir)
    assert set(adapter.weights) == {(1, "q_proj"), (1, "v_proj")}
    assert adapter.target_projections == ("q_proj", "v_proj") and adapter.target_layers == (1,)


def _default_keys(tensors: dict[str, torch.Tensor]) -> None:
    """PEFT's in-memory names, with the adapter name ("default") kept."""
    for key in list(tensors):
        tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)


def test_regex_target_and_default_keys(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    adapter_dir = write_random_adapter(model_dir, tmp_path / "a", targets=["q_proj", "down_proj"], layers=[0])
    regex = r".*\.layers\.0\.(self_attn\.q|mlp\.down)_proj"
    _edit_config(adapter_dir, target_modules=regex, layers_to_transform=None)
    _edit_tensors(adapter_dir, _default_keys)
    adapter = _load(model_dir, adapter_dir)
    assert set(adapter.weights) == {(0, "q_proj"), (0, "down_proj")}


def test_all_linear_minus_excluded(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tiny_model("mistral")
    targets = [p for p in PROJECTIONS if p != "k_proj"]
    adapter_dir = write_random_adapter(model_dir, tmp_path / "a", targets=targets)
    _edit_config(adapter_dir, target_modules="all-linear", exclude_modules=["k_proj"])
    adapter = _load(model_dir, adapter_dir)
    assert adapter.target_projections == tuple(targets) and len(adapter.weights) == 2 * len(targets)


def _set_nan(tensors: dict[str, torch.Tensor]) -> None:
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][3, 2] = float("nan")


def _narrow_a(tensors: dict[str, torch.Tensor]) -> None:
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :32].contiguous()


def _drop_b(tensors: dict[str, torch.Tensor]) -> None:
    del tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"]


def _add_lm_head(tensors: dict[str, torch.Tensor]) -> None:
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)


# (id, config fields to change, tensor edit, load keyword overrides, words the message must hold)
REFUSALS: list[tuple[str, dict[str, Any], Any, dict[str, int], tuple[str, ...]]] = [
    ("rank_too_big", {}, None, {"max_rank": 4}, ("rank 8", "max_rank 4")),
    ("lm_head_target", {"target_modules": ["q_proj", "lm_head"]}, None, {}, ("'lm_head'", "not a decoder")),
    ("embed_regex", {"target_modules": r".*(embed_tokens|q_proj)"}, None, {}, ("model.embed_tokens",)),
    ("lm_head_tensor", {}, _add_lm_head, {}, ("lm_head.lora_A", "lm_head tensor")),
    ("bias", {"bias": "lora_only"}, None, {}, ("bias 'lora_only'",)),
    ("dora", {"use_dora": True}, None, {}, ("use_dora", "DoRA")),
    ("fan_in_fan_out", {"fan_in_fan_out": True}, None, {}, ("fan_in_fan_out",)),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, None, {}, ("modules_to_save",)),
    ("rank_pattern", {"rank_pattern": {"q_proj": 4}}, None, {}, ("rank_pattern",)),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": 4}}, None, {}, ("alpha_pattern",)),
    ("not_lora", {"peft_type": "IA3"}, None, {}, ("peft_type 'IA3'",)),
    ("shape", {}, _narrow_a, {}, ("layers.0.self_attn.o_proj.lora_A", "shape [8, 32]", "expected [8, 64]")),
    ("missing_b", {}, _drop_b, {}, ("layers.0.mlp.gate_proj", "no lora_B")),
    ("nan", {}, _set_nan, {}, ("layers.1.mlp.up_proj.lora_B", "non-finite")),
    ("layer_out_of_range", {}, None, {"num_layers": 1}, ("layer 1", "out of range")),
    ("layers_to_transform_range", {"layers_to_transform": [5]}, None, {}, ("layers_to_transform", "layer 5")),
    ("untargeted_tensor", {"target_modules": ["q_proj", "k_proj"]}, None, {}, ("v_proj", "does not target")),
    ("targeted_without_tensor", {"layers_to_transform": None}, None, {}, ("layers.0.self_attn.q_proj",
                                                                         "no lora_A/lora_B")),
]


@pytest.mark.parametrize(
    ("config", "edit", "overrides", "words"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusals_name_the_adapter_and_the_problem(
    tiny_model: Callable[[str], Path],
    tmp_path: Path,
    config: dict[str, Any],
    edit: Any,
    overrides: dict[str, int],
    words: tuple[str, ...],
) -> None:
    model_dir = tiny_model("llama")
    # layers [1] only when the case needs a layer left out ("targeted_without_tensor").
    layers = [1] if "layers_to_transform" in config and config["layers_to_transform"] is None else None
    adapter_dir = write_random_adapter(model_dir, tmp_path / "ad", layers=layers)
    if config:
        _edit_config(adapter_dir, **config)
    if edit is not None:
        _edit_tensors(adapter_dir, edit)
    with pytest.raises(ValueError) as raised:
        _load(model_dir, adapter_dir, **overrides)
    message = str(raised.value)
    assert message.startswith("LoRA adapter 'ad': ")
    for word in words:
        assert word in message


def test_pickled_adapter_is_refused_unread(
    tiny_model: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny_model("llama")
    adapter_dir = write_random_adapter(model_dir, tmp_path / "ad")
    (adapter_dir / WEIGHTS).unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(b"not a pickle: reading it would fail loudly")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the pickled adapter was read")

    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, attr, never)
    with pytest.raises(ValueError, match=r"LoRA adapter 'ad': .*adapter_model\.bin.*safetensors"):
        _load(model_dir, adapter_dir)


def test_missing_files_are_refused(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    with pytest.raises(ValueError, match="is not a directory"):
        _load(model_dir, tmp_path / "nowhere")
    adapter_dir = write_random_adapter(model_dir, tmp_path / "ad")
    (adapter_dir / WEIGHTS).unlink()
    with pytest.raises(ValueError, match=f"no {WEIGHTS}"):
        _load(model_dir, adapter_dir)


def _logits(model: Any, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


PROMPT = [1, 504, 3277, 314, 260, 6219, 30, 1770, 1345, 288]


def test_merged_model_applies_the_adapter(
    tiny_model: Callable[[str], Path], hf_model: Callable[[Path], Any], tmp_path: Path
) -> None:
    model_dir = tiny_model("llama")
    base = _logits(hf_model(model_dir), PROMPT)
    adapter_dir = write_random_adapter(model_dir, tmp_path / "ad")
    merged = _logits(merged_model(model_dir, adapter_dir), PROMPT)
    assert torch.isfinite(merged).all()
    assert (merged - base).abs().max() > 0.1
    assert not torch.equal(merged.argmax(-1), base.argmax(-1))  # greedy tokens change

    zero_b = lambda t: t.update({k: torch.zeros_like(v) for k, v in t.items() if "lora_B" in k})
    _edit_tensors(adapter_dir, zero_b)
    assert torch.equal(_logits(merged_model(model_dir, adapter_dir), PROMPT), base)


def test_lora_flags_take_vllms_form_and_the_variable() -> None:
    """``--lora-modules a=/p b=/q`` (vLLM's) and ``LLMSERVE_LORA_MODULES="a=/p,b=/q"`` give the
    same adapters; a malformed item or a name taken twice is refused."""
    from gpu_worker.__main__ import build_parser, configs_from_args
    from gpu_worker.config import EngineConfig

    flags = build_parser({}).parse_args(["--model", "m", "--lora-modules", "a=/p", "b=/q",
                                         "--max-lora-rank", "32"])
    variable = build_parser({"LLMSERVE_MODEL": "m", "LLMSERVE_LORA_MODULES": "a=/p,b=/q"}).parse_args([])
    for args in (flags, variable):
        engine, _ = configs_from_args(args)
        assert engine.lora_adapters == (("a", "/p"), ("b", "/q"))
    assert configs_from_args(flags)[0].max_lora_rank == 32
    for bad, match in (("a", "NAME=PATH"), ("a=/p,a=/q", "distinct"), ("m=/p", "distinct")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(model="m", lora_modules=bad)
    with pytest.raises(ValueError, match="max_lora_rank"):
        EngineConfig(model="m", max_lora_rank=0)
    with pytest.raises(ValueError, match="16/32-bit"):
        EngineConfig(model="m", lora_modules="a=/p", quantization="fp8")
