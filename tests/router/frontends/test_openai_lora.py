"""LoRA adapters through the whole stack: ``llmserve up --lora-modules`` (router and worker in one
process), the official ``openai`` SDK asking for the adapter by name. The router routes the
adapter's name to the worker (its record lists it), ``/v1/models`` shows it with its parent,
and its greedy text equals the offline engine's with the same adapter (and differs from the
base model's); an unknown name is 404. With ``--lora-root`` adapters load and unload while the
stack serves (vLLM's ``/v1/load_lora_adapter``): a loaded one is routed at once and generates
what the same files do as a configured adapter, an unloaded one is 404 again, and the worker's
refusals (a folder outside the root, a name taken, a name that once meant other files) reach
the caller as 400 naming why."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from gpu_worker import LLM, SamplingParams
from llmserve.client import Client
from tests.helpers.lora_adapters import write_random_adapter
from tests.router.frontends.stack_proc import MODEL, StackProc, http_json

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


@pytest.fixture(scope="module")
def lora_root(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stack's --lora-root: "sql" (also served by --lora-modules) and "other"."""
    root = tmp_path_factory.mktemp("lora")
    write_random_adapter(tiny_model("llama"), root / "sql", rank=8, seed=3)
    write_random_adapter(tiny_model("llama"), root / "other", rank=4, seed=4)
    return root


@pytest.fixture(scope="module")
def adapter_dir(lora_root: Path) -> Path:
    return lora_root / "sql"


@pytest.fixture(scope="module")
def lora_stack(tiny_model: Callable[[str], Path], otlp_receiver: Any, adapter_dir: Path, lora_root: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProc]:
    proc = StackProc(tiny_model("llama"), tmp_path_factory.mktemp("lora-stack") / "llmserve-up.log",
                     otlp_receiver.endpoint,
                     extra_args=("--lora-modules", f"sql={adapter_dir}", "--lora-root", str(lora_root)))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_an_adapter_is_a_model_of_its_own(lora_stack: StackProc, adapter_dir: Path,
                                          tiny_model: Callable[[str], Path]) -> None:
    client = OpenAI(base_url=lora_stack.openai_url, api_key="unused", max_retries=0)
    cards = {m.id: m.model_dump() for m in client.models.list()}
    assert cards[MODEL]["parent"] is None and cards["sql"]["parent"] == MODEL
    with LLM(model=str(tiny_model("llama")), num_kv_blocks=64, lora_modules=f"sql={adapter_dir}") as llm:
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        offline_sql, offline_base = (o.outputs[0].text for o in llm.generate(
            [PROMPT, PROMPT], params, lora_request=["sql", None]))
    assert offline_sql != offline_base
    args: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                            "extra_body": {"ignore_eos": True}}
    assert client.completions.create(model="sql", **args).choices[0].text == offline_sql
    assert client.completions.create(model=MODEL, **args).choices[0].text == offline_base
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="sql", stream=True, **args))
    assert streamed == offline_sql
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", **args)
    with Client(lora_stack.grpc_target) as native:  # llmserve.v1.Generation
        models = {m.name: m.parent for m in native.list_models()}
        assert models == {MODEL: "", "sql": MODEL}
        native_sql = native.complete("sql", prompt=PROMPT, max_tokens=10, temperature=0.0, ignore_eos=True)
        assert native_sql.text == offline_sql


def test_adapters_load_and_unload_while_the_stack_serves(lora_stack: StackProc, lora_root: Path,
                                                         tmp_path: Path) -> None:
    client = OpenAI(base_url=lora_stack.openai_url, api_key="unused", max_retries=0)
    args: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                            "extra_body": {"ignore_eos": True}}
    configured = client.completions.create(model="sql", **args).choices[0].text

    def post(route: str, body: dict[str, Any]) -> tuple[int, Any]:
        return http_json("POST", f"{lora_stack.openai_url}/{route}", body)

    assert post("load_lora_adapter", {"lora_name": "sql-live", "lora_path": str(lora_root / "sql")}) == (
        200, "Success: LoRA adapter 'sql-live' added successfully.")
    cards = {m.id: m.model_dump() for m in client.models.list()}
    assert cards["sql-live"]["parent"] == MODEL
    assert client.completions.create(model="sql-live", **args).choices[0].text == configured
    refusals = [
        ({"lora_name": "sql-live", "lora_path": str(lora_root / "sql")}, "already loaded"),
        ({"lora_name": "x", "lora_path": str(tmp_path)}, "not under this worker's --lora-root"),
        ({"lora_name": "x", "lora_path": str(lora_root / "missing")}, "not a folder"),
    ]
    for body, needle in refusals:
        status, reply = post("load_lora_adapter", body)
        assert status == 400 and needle in reply["error"]["message"], reply
    assert post("unload_lora_adapter", {"lora_name": "sql-live"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql-live", **args)
    status, reply = post("unload_lora_adapter", {"lora_name": "sql-live"})
    assert status == 404
    # the name keeps its files for the worker's lifetime: other files under it are refused
    status, reply = post("load_lora_adapter", {"lora_name": "sql-live",
                                               "lora_path": str(lora_root / "other")})
    assert status == 400 and "served with other files before" in reply["error"]["message"]
    assert post("load_lora_adapter", {"lora_name": "other", "lora_path": str(lora_root / "other")})[0] == 200
    other = client.completions.create(model="other", **args).choices[0].text
    assert other != configured
    with Client(lora_stack.grpc_target) as native:
        assert {m.name: m.parent for m in native.list_models()} == {MODEL: "", "sql": MODEL, "other": MODEL}
    assert post("unload_lora_adapter", {"lora_name": "other"})[0] == 200
