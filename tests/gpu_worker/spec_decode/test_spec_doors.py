"""Speculative decoding through the worker's gRPC door (``llmserve.v1.Generation``; the OpenAI
and KServe doors reach workers through it): a loopback worker started with an n-gram
``speculative_config`` serves a copying request, a structured-output request and a plain one
in the same steps; the tokens equal the offline plain engine's, the grammar holds, every KV
block is free afterwards, and ``/metrics`` exports what was drafted and accepted (the
acceptance rate is accepted / draft tokens)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gpu_worker import LLM, SamplingParams
from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect, greedy, wait_idle

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
ENGINE: dict[str, Any] = dict(served_model_name=SERVED_NAME, num_kv_blocks=64, max_num_seqs=8,
                              max_num_batched_tokens=64, enforce_eager=True)
COPY_PROMPT = [10 + (j % 9) * 3 for j in range(40)]  # a 9-token cycle: lookup finds drafts
PLAIN_PROMPT = [1, 504, 3458, 282, 4649, 314]
REGEX = r"[a-c]{3,25}x"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(tiny_model: Callable[[str], Path]) -> AsyncIterator[WorkerServer]:
    config = EngineConfig(model=str(tiny_model("llama")), speculative_config=SPEC, **ENGINE)  # type: ignore[arg-type]
    server = WorkerServer(config, ServerConfig(port=0, metrics_port=0, stats_interval_s=0.05))
    await server.start()
    await server.wait_ready()
    yield server
    await server.drain(0.1)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def ids(tokens: list[int]) -> pb.TokenIds:
    return pb.TokenIds(ids=tokens)


async def test_generate_with_drafts_equals_plain_decoding(
    worker: WorkerServer, tiny_model: Callable[[str], Path]
) -> None:
    structured = pb.SamplingParams(max_tokens=30, temperature=0.0,
                                   structured_output=pb.StructuredOutput(regex=REGEX))
    requests = [
        pb.GenerateRequest(model=SERVED_NAME, request_id="copy", prompt_token_ids=ids(COPY_PROMPT),
                           sampling=greedy(24)),
        pb.GenerateRequest(model=SERVED_NAME, request_id="regex", prompt="Say something:",
                           sampling=structured),
        pb.GenerateRequest(model=SERVED_NAME, request_id="plain", prompt_token_ids=ids(PLAIN_PROMPT),
                           sampling=greedy(16)),
    ]
    async with grpc.aio.insecure_channel(worker.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        got = await asyncio.gather(*(collect(stub.Generate(r)) for r in requests))  # batched together
        await wait_idle(ipb_grpc.WorkerControlStub(channel))  # every KV block back in the free list

    with LLM(model=str(tiny_model("llama")), num_kv_blocks=64, enforce_eager=True) as plain:
        want = plain.generate(
            [COPY_PROMPT, "Say something:", PLAIN_PROMPT],
            [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=30, structured_output={"regex": REGEX}),
             SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)],
        )
    assert [g.token_ids[0] for g in got] == [list(w.outputs[0].token_ids) for w in want]
    text = got[1].text[0]
    assert re.fullmatch(REGEX, text), text
    assert got[1].finish[0] == "stop"

    metrics = scrape(worker.metrics_port)
    label = (("model_name", SERVED_NAME),)
    drafts = metrics[("llmserve:spec_decode_num_draft_tokens_total", label)]
    accepted = metrics[("llmserve:spec_decode_num_accepted_tokens_total", label)]
    assert 0 < accepted <= drafts and metrics[("llmserve:spec_decode_num_drafts_total", label)] > 0
    first = metrics[("llmserve:spec_decode_num_accepted_tokens_per_pos_total", (*label, ("position", "0")))]
    assert 0 < first <= accepted
