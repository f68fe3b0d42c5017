"""LoRA adapters loaded and unloaded while the engine serves (``lora_root``, vLLM's runtime
loading): a loaded adapter generates exactly what HF generates with it merged, token for token,
on one rank and on two (TP, gloo); slots are bounded, freed by unloads once the adapter's
requests end (a running stream finishes on its adapter), and reused; a name keeps its files for
the engine's lifetime; only folders under ``lora_root`` load."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, EngineConfig, SamplingParams
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.lora.registry import LoraUpdateError
from tests.gpu_worker.engine.engine_helpers import hf_greedy
from tests.helpers.lora_adapters import merged_model, write_random_adapter

PROMPTS = [[(13 * i + 5 * j) % 3000 + 11 for j in range(6 + 11 * i)] for i in range(3)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def root(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --lora-root with three adapters of the tiny Llama."""
    folder = tmp_path_factory.mktemp("lora-root")
    model = tiny_model("llama")
    write_random_adapter(model, folder / "a", rank=8, seed=11)
    write_random_adapter(model, folder / "b", rank=4, targets=("q_proj", "v_proj"), seed=12)
    write_random_adapter(model, folder / "c", rank=8, seed=13)
    return folder


@pytest.fixture(scope="module")
def want(tiny_model: Callable[[str], Path], hf_model: Callable[[Path], Any], root: Path
         ) -> dict[str | None, list[list[int]]]:
    model = tiny_model("llama")
    out: dict[str | None, list[list[int]]] = {None: [hf_greedy(hf_model(model), p, 8) for p in PROMPTS]}
    for name in "abc":
        merged = merged_model(model, root / name)
        out[name] = [hf_greedy(merged, p, 8) for p in PROMPTS]
    return out


def tokens(outputs: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_load_serve_unload_and_reuse_slots(tiny_model: Callable[[str], Path], root: Path,
                                           want: dict[str | None, list[list[int]]], tmp_path: Path) -> None:
    with LLM(model=str(tiny_model("llama")), skip_tokenizer_init=True, num_kv_blocks=64,
             max_num_batched_tokens=16, lora_root=str(root), max_loras=2) as llm:
        assert tokens(llm.generate(PROMPTS, GREEDY)) == want[None]
        with pytest.raises(ValueError, match="not served"):
            llm.generate(PROMPTS[:1], GREEDY, lora_request="a")
        llm.load_lora_adapter("a", str(root / "a"))
        llm.load_lora_adapter("b", str(root / "b"))
        mixed = llm.generate(PROMPTS * 3, GREEDY, lora_request=["a"] * 3 + ["b"] * 3 + [None] * 3)
        assert tokens(mixed) == want["a"] + want["b"] + want[None]
        with pytest.raises(LoraUpdateError, match="every LoRA slot is taken"):
            llm.load_lora_adapter("c", str(root / "c"))
        with pytest.raises(LoraUpdateError, match="already loaded"):
            llm.load_lora_adapter("a", str(root / "a"))
        llm.unload_lora_adapter("a")
        with pytest.raises(ValueError, match="not served"):
            llm.generate(PROMPTS[:1], GREEDY, lora_request="a")
        with pytest.raises(LoraUpdateError, match="is not loaded"):
            llm.unload_lora_adapter("a")
        llm.load_lora_adapter("c", str(root / "c"))  # into a's emptied slot
        assert tokens(llm.generate(PROMPTS, GREEDY, lora_request="c")) == want["c"]
        assert tokens(llm.generate(PROMPTS, GREEDY, lora_request="b")) == want["b"]
        llm.unload_lora_adapter("b")
        # a name keeps its files: "a" again from its own folder (a copy is the same content) is
        # fine, "a" from c's files is refused
        copy = root / "a-copy"
        shutil.copytree(root / "a", copy, dirs_exist_ok=True)
        with pytest.raises(LoraUpdateError, match="served with other files before"):
            llm.load_lora_adapter("a", str(root / "c"))
        llm.load_lora_adapter("a", str(copy))
        assert tokens(llm.generate(PROMPTS, GREEDY, lora_request="a")) == want["a"]
        # only folders under lora_root; the base model's name is not an adapter's
        outside = write_random_adapter(tiny_model("llama"), tmp_path / "outside", rank=4, seed=3)
        llm.unload_lora_adapter("c")
        for name, path, needle in (("x", str(outside), "not under this worker's --lora-root"),
                                   ("x", str(root / ".." / outside.name), "not under"),
                                   ("x", str(root / "missing"), "not a folder"),
                                   (llm.engine.config.model_name, str(root / "b"), "not a usable")):
            with pytest.raises(LoraUpdateError, match=needle):
                llm.load_lora_adapter(name, path)
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks


def test_runtime_loading_is_off_without_a_root(tiny_model: Callable[[str], Path], root: Path) -> None:
    with LLM(model=str(tiny_model("llama")), skip_tokenizer_init=True, num_kv_blocks=16) as llm:
        with pytest.raises(LoraUpdateError, match="runtime LoRA loading is off"):
            llm.load_lora_adapter("a", str(root / "a"))


def test_tensor_parallel_ranks_load_the_adapter_too(tiny_model: Callable[[str], Path], root: Path,
                                                     want: dict[str | None, list[list[int]]]) -> None:
    with LLM(model=str(tiny_model("llama")), skip_tokenizer_init=True, num_kv_blocks=64,
             tensor_parallel_size=2, lora_root=str(root), max_loras=1) as llm:
        llm.load_lora_adapter("a", str(root / "a"))
        assert tokens(llm.generate(PROMPTS, GREEDY, lora_request="a")) == want["a"]
        llm.unload_lora_adapter("a")
        llm.load_lora_adapter("c", str(root / "c"))  # the same slot, rewritten on both ranks
        assert tokens(llm.generate(PROMPTS, GREEDY, lora_request=["c", None, "c"])) == [
            want["c"][0], want[None][1], want["c"][2]]


def test_an_unload_lets_running_streams_finish_on_their_adapter(
        tiny_model: Callable[[str], Path], root: Path, want: dict[str | None, list[list[int]]]) -> None:
    config = EngineConfig(model=str(tiny_model("llama")), skip_tokenizer_init=True, num_kv_blocks=64,
                          lora_root=str(root), max_loras=1, engine_core_process=True, async_scheduling=True)
    engine = AsyncLLM.from_config(config)

    async def run() -> None:
        await engine.load_lora_adapter("a", str(root / "a"))
        assert engine.lora_adapters == ("a",)
        long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        stream = engine.generate(PROMPTS[1], long, "s1", lora_name="a")
        first = await stream.__anext__()  # running on a's slot
        await engine.unload_lora_adapter("a")
        assert engine.lora_adapters == ()
        with pytest.raises(ValueError, match="not served"):
            await engine.generate(PROMPTS[0], GREEDY, "s2", lora_name="a").__anext__()
        with pytest.raises(LoraUpdateError, match="slot is taken|unload waits"):
            await engine.load_lora_adapter("c", str(root / "c"))  # a's slot is still held
        rest = [out async for out in stream]
        got = [*first.outputs[0].token_ids, *(t for out in rest for t in out.outputs[0].token_ids)]
        assert got[:8] == want["a"][1]  # the whole stream ran on a
        await engine.load_lora_adapter("c", str(root / "c"))  # freed once the stream ended
        outputs = [out async for out in engine.generate(PROMPTS[2], GREEDY, "s3", lora_name="c")]
        assert [t for out in outputs for t in out.outputs[0].token_ids] == want["c"][2]

    try:
        asyncio.run(run())
    finally:
        asyncio.run(engine.shutdown())
