"""``/v1/embeddings`` through the official ``openai`` SDK on a real ``llmserve up`` stack whose
worker embeds (``--runner pooling``, a tiny Qwen3): the vectors equal the offline engine's, base64
(the SDK's default) and float alike, one per input of a batch; a task the worker does not serve is
refused with 400, both ways; the native client's ``embed=True`` gets the same vector. vLLM's
score and rerank APIs (plain HTTP: no official client) are the cosine similarities of the offline
engine's vectors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from gpu_worker import LLM
from llmserve.client import Client
from router.frontends.pooling_api import cosine
from tests.router.frontends.stack_proc import MODEL, StackProc, http_json

INPUTS = [[(11 * i + 7 * j) % 3000 + 5 for j in range(4 + 9 * i)] for i in range(3)]


@pytest.fixture(scope="module")
def pooling_stack(tiny_model: Callable[[str], Path], otlp_receiver: Any,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProc]:
    proc = StackProc(tiny_model("qwen3"), tmp_path_factory.mktemp("pooling") / "llmserve-up.log",
                     otlp_receiver.endpoint, extra_args=("--runner", "pooling"))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_embeddings_equal_the_offline_engines(pooling_stack: StackProc,
                                              tiny_model: Callable[[str], Path]) -> None:
    with LLM(model=str(tiny_model("qwen3")), runner="pooling", num_kv_blocks=64) as llm:
        expected = [o.embedding for o in llm.embed(INPUTS + ["A text input."])]
    client = OpenAI(base_url=pooling_stack.openai_url, api_key="unused", max_retries=0)
    batch = client.embeddings.create(model=MODEL, input=INPUTS)  # the SDK asks for base64
    assert [d.index for d in batch.data] == [0, 1, 2] and batch.model == MODEL
    for item, want in zip(batch.data, expected, strict=False):
        assert item.embedding == pytest.approx(want, abs=1e-6)
    assert batch.usage.prompt_tokens == sum(len(i) for i in INPUTS) == batch.usage.total_tokens
    text = client.embeddings.create(model=MODEL, input="A text input.", encoding_format="float")
    assert text.data[0].embedding == pytest.approx(expected[3], abs=1e-6)
    with Client(pooling_stack.grpc_target) as native:  # llmserve.v1.Generation, TASK_EMBED
        one = native.complete(MODEL, prompt_token_ids=INPUTS[1], embed=True)
    assert list(one.embedding) == pytest.approx(expected[1], abs=1e-6)
    assert one.usage is not None and one.usage.prompt_tokens == len(INPUTS[1]) and not one.sequences
    with pytest.raises(openai.BadRequestError, match="serves embeddings"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input="x", dimensions=8)
    assert refused.value.param == "dimensions"  # type: ignore[attr-defined]


def test_a_generating_model_has_no_embeddings(stack: StackProc) -> None:
    client = OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="has no embeddings"):
        client.embeddings.create(model=MODEL, input="Hi")


TEXTS = ["The cat sat.", "A dog ran far away.", "Stocks fell sharply today.", "The kitten slept."]


def test_score_and_rerank_are_cosines_of_the_embeddings(pooling_stack: StackProc,
                                                        tiny_model: Callable[[str], Path]) -> None:
    with LLM(model=str(tiny_model("qwen3")), runner="pooling", num_kv_blocks=64) as llm:
        vectors = [o.embedding for o in llm.embed(TEXTS)]
    query, documents = vectors[0], vectors[1:]
    status, one_to_many = http_json("POST", f"{pooling_stack.openai_url}/score", {
        "model": MODEL, "text_1": TEXTS[0], "text_2": TEXTS[1:]})
    assert status == 200 and one_to_many["object"] == "list" and one_to_many["model"] == MODEL
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2]
    assert [d["score"] for d in one_to_many["data"]] == pytest.approx([cosine(query, d) for d in documents],
                                                                      abs=1e-5)
    status, pairs = http_json("POST", f"{pooling_stack.http_url}/score", {
        "model": MODEL, "text_1": TEXTS[:2], "text_2": [TEXTS[3], TEXTS[0]]})
    assert status == 200 and [d["score"] for d in pairs["data"]] == pytest.approx(
        [cosine(vectors[0], vectors[3]), cosine(vectors[1], vectors[0])], abs=1e-5)
    status, ranked = http_json("POST", f"{pooling_stack.openai_url}/rerank", {
        "model": MODEL, "query": TEXTS[0], "documents": [TEXTS[1], {"text": TEXTS[2]}, TEXTS[3]], "top_n": 2})
    expected = sorted(((cosine(query, d), i) for i, d in enumerate(documents)), key=lambda p: -p[0])[:2]
    assert status == 200 and [(r["index"], r["document"]["text"]) for r in ranked["results"]] == [
        (i, TEXTS[i + 1]) for _, i in expected]
    scores = [r["relevance_score"] for r in ranked["results"]]
    assert scores == pytest.approx([s for s, _ in expected], abs=1e-5)
    # each distinct text is embedded once: the query and three documents
    embedded = OpenAI(base_url=pooling_stack.openai_url, api_key="unused").embeddings.create(model=MODEL,
                                                                                             input=TEXTS)
    assert ranked["usage"]["total_tokens"] == embedded.usage.prompt_tokens
    for path, body, param in (("score", {"text_1": ["a", "b"], "text_2": ["c"] * 3}, "text_2"),
                              ("score", {"text_1": "", "text_2": "c"}, "text_1"),
                              ("v2/rerank", {"query": "q", "documents": [{"no": 1}]}, "documents[0]"),
                              ("rerank", {"query": "q", "documents": []}, "documents")):
        status, refused = http_json("POST", f"{pooling_stack.http_url}/{path}", {"model": MODEL, **body})
        assert (status, refused["error"]["param"]) == (400, param), (path, refused)

