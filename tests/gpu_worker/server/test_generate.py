"""A real worker on loopback serving a tiny llama: streaming, parity with the offline API,
concurrency, cancellation and deadlines, and error statuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gpu_worker.config import EngineConfig
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.gpu_worker.server.worker_server_helpers import (
    ENGINE_ARGS,
    SERVED_NAME,
    Collected,
    collect,
    greedy,
    wait_idle,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
MAX_MESSAGE_BYTES = 1 << 20


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(engine_config: EngineConfig) -> AsyncIterator[WorkerServer]:
    server = WorkerServer(engine_config, ServerConfig(port=0, max_message_bytes=MAX_MESSAGE_BYTES))
    await server.start()
    await server.wait_ready()
    yield server
    await server.drain(0.1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(worker: WorkerServer) -> AsyncIterator[grpc.aio.Channel]:
    options = [
        ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", -1),
    ]
    async with grpc.aio.insecure_channel(worker.target, options=options) as ch:
        yield ch


@pytest.fixture
def gen(channel: grpc.aio.Channel) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(channel)


@pytest.fixture
def control(channel: grpc.aio.Channel) -> ipb_grpc.WorkerControlStub:
    return ipb_grpc.WorkerControlStub(channel)


# -- parity with the offline API ------------------------------------------------------------

PARITY_CASES = [
    (
        "text greedy",
        pb.GenerateRequest(prompt="The capital of France is", sampling=greedy(24)),
        "The capital of France is",
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    ),
    (
        "token ids greedy",
        pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=[1, 504, 3458, 282, 4649, 314]), sampling=greedy(17)
        ),
        [1, 504, 3458, 282, 4649, 314],
        SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True),
    ),
    (
        "seeded sampling n=2",
        pb.GenerateRequest(
            prompt="Once upon a time",
            sampling=pb.SamplingParams(
                max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=1234, n=2, ignore_eos=True
            ),
        ),
        "Once upon a time",
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=1234, n=2, ignore_eos=True),
    ),
]


@pytest.fixture(scope="module")
def offline_outputs(tiny_model_dir: Path) -> list[Any]:
    """The offline API's outputs for PARITY_CASES (same model, same engine arguments)."""
    from gpu_worker import LLM

    llm = LLM(model=str(tiny_model_dir), **ENGINE_ARGS)
    prompts: list[Any] = [case[2] for case in PARITY_CASES]
    params: list[Any] = [case[3] for case in PARITY_CASES]
    outputs: list[Any] = [llm.generate([prompt], p)[0] for prompt, p in zip(prompts, params, strict=True)]
    shutdown = getattr(llm, "shutdown", None)
    if callable(shutdown):
        shutdown()
    return outputs


@pytest.mark.parametrize("case", range(len(PARITY_CASES)), ids=[c[0] for c in PARITY_CASES])
async def test_stream_equals_offline_api(
    gen: pb_grpc.GenerationStub, offline_outputs: list, case: int
) -> None:
    request = PARITY_CASES[case][1]
    request.model = SERVED_NAME
    got = await collect(gen.Generate(request))
    expected = offline_outputs[case]
    assert len(got.text) == len(expected.outputs)
    for seq in expected.outputs:
        assert got.token_ids[seq.index] == list(seq.token_ids)
        assert got.text[seq.index] == seq.text
        assert got.finish[seq.index] == "length"
    usage = got.last.usage
    assert usage.prompt_tokens == len(expected.prompt_token_ids)
    assert usage.completion_tokens == sum(len(s.token_ids) for s in expected.outputs)
    assert got.last.worker_id
    assert all(c.request_id == got.last.request_id and c.request_id for c in got.chunks)


async def test_chat_messages_and_stop_string(gen: pb_grpc.GenerationStub, tiny_model_dir: Path) -> None:
    """Chat input is rendered with the template; a stop string ends the sequence and is cut; a
    stop token id ends it and is reported as an id."""
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi there")])

    async def chat(sampling: pb.SamplingParams, request_id: str = "") -> Collected:
        request = pb.GenerateRequest(model=SERVED_NAME, sampling=sampling, messages=messages)
        request.request_id = request_id
        return await collect(gen.Generate(request))

    first = await chat(greedy(16), "chat-1")
    text = first.text[0]
    assert first.last.request_id == "chat-1" and len(first.token_ids[0]) == 16
    assert first.last.usage.prompt_tokens > 3  # the template added its role markers
    # Stop at a piece of what greedy decoding produces: the output is the text before it.
    k = next(i for i in range(len(text) // 2, len(text) - 2) if text.find(text[i : i + 2]) == i)
    stop = text[k : k + 2]
    cut = await chat(greedy(16, stop=[stop]))
    assert cut.finish[0] == "stop" and cut.last.stop_reason == stop
    assert not cut.last.HasField("stop_token_id")  # a stop string is text only
    assert cut.text[0] == text[:k]
    # A stop token id ends the sequence with that token and is reported typed as well as as text.
    token = first.token_ids[0][5]
    end = first.token_ids[0].index(token) + 1
    by_id = await chat(greedy(16, stop_token_ids=[token]))
    assert by_id.token_ids[0] == first.token_ids[0][:end] and by_id.finish[0] == "stop"
    assert by_id.last.stop_token_id == token and by_id.last.stop_reason == str(token)


async def test_logprobs_are_streamed(gen: pb_grpc.GenerationStub) -> None:
    got = await collect(
        gen.Generate(pb.GenerateRequest(model=SERVED_NAME, prompt="Hello", sampling=greedy(5, logprobs=3)))
    )
    logprobs = [lp for c in got.chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == got.token_ids[0]
    for lp in logprobs:
        assert len(lp.top) == 3 and lp.rank == 1  # greedy picks the most likely token
        assert lp.top[0].token_id == lp.token_id and lp.logprob <= 0.0


async def test_64_concurrent_streams(
    gen: pb_grpc.GenerationStub, control: ipb_grpc.WorkerControlStub
) -> None:
    """All finish with their own max_tokens; each stream carries only its own request id and text."""
    prompts = [f"Request number {i}: tell me about topic {i * 7}" for i in range(64)]

    async def one(i: int) -> tuple[int, Collected]:
        request = pb.GenerateRequest(
            model=SERVED_NAME, prompt=prompts[i], request_id=f"c{i}", sampling=greedy(8 + i % 9)
        )
        return i, await collect(gen.Generate(request))

    results = await asyncio.gather(*(one(i) for i in range(64)))
    for i, got in results:
        assert {c.request_id for c in got.chunks} == {f"c{i}"}
        assert len(got.token_ids[0]) == 8 + i % 9 == got.last.usage.completion_tokens
        assert got.finish == {0: "length"}
    # Same prompt alone gives the same tokens: nothing was mixed between streams.
    for i in (0, 31, 63):
        alone = await collect(
            gen.Generate(pb.GenerateRequest(model=SERVED_NAME, prompt=prompts[i], sampling=greedy(8 + i % 9)))
        )
        assert alone.token_ids == results[i][1].token_ids
    await wait_idle(control)


# -- cancellation and deadlines free the KV blocks ------------------------------------------


async def test_cancel_frees_kv_blocks(
    gen: pb_grpc.GenerationStub, control: ipb_grpc.WorkerControlStub
) -> None:
    await wait_idle(control)
    call = gen.Generate(pb.GenerateRequest(model=SERVED_NAME, prompt="Count forever:", sampling=greedy(480)))
    first = await call.read()
    assert first.token_ids
    busy = await control.GetWorkerInfo(ipb.GetWorkerInfoRequest())
    assert busy.load.num_running == 1 and busy.load.num_free_kv_blocks < busy.load.num_kv_blocks
    assert call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    await wait_idle(control)


async def test_deadline_frees_kv_blocks(
    gen: pb_grpc.GenerationStub, control: ipb_grpc.WorkerControlStub
) -> None:
    await wait_idle(control)
    # 8 sequences x 480 tokens take far longer than the deadline on any CPU.
    request = pb.GenerateRequest(model=SERVED_NAME, prompt="Count forever:", sampling=greedy(480, n=8))
    call = gen.Generate(request, timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_idle(control)


# -- errors -----------------------------------------------------------------------------------


def _req(**kw: Any) -> pb.GenerateRequest:
    kw.setdefault("model", SERVED_NAME)
    if not any(k in kw for k in ("prompt", "prompt_token_ids", "messages", "no_input")):
        kw["prompt"] = "Hello"
    kw.pop("no_input", None)
    return pb.GenerateRequest(**kw)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = [
    ("no input", _req(no_input=True), INVALID, "input"),
    ("empty prompt", _req(prompt=""), INVALID, "prompt must not be empty"),
    ("empty token ids", _req(prompt_token_ids=pb.TokenIds()), INVALID, "prompt_token_ids"),
    ("token id beyond vocab", _req(prompt_token_ids=pb.TokenIds(ids=[1, 10**8])), INVALID, "vocabulary"),
    ("negative token id", _req(prompt_token_ids=pb.TokenIds(ids=[1, -3])), INVALID, "prompt_token_ids"),
    ("prompt over max_model_len", _req(prompt_token_ids=pb.TokenIds(ids=[5] * 600)), INVALID, "too long"),
    ("empty messages", _req(messages=pb.ChatMessages()), INVALID, "messages"),
    (
        "message without role",
        _req(messages=pb.ChatMessages(messages=[pb.ChatMessage(content="x")])),
        INVALID,
        "role",
    ),
    (
        "continue_final_message with the generation prompt",
        _req(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="x")],
                                      continue_final_message=True)),
        INVALID,
        "continue_final_message needs add_generation_prompt false",
    ),
    ("unknown model", _req(model="gpt-17"), grpc.StatusCode.NOT_FOUND, SERVED_NAME),
    ("negative temperature", _req(sampling=pb.SamplingParams(temperature=-1)), INVALID, "temperature"),
    ("top_p zero", _req(sampling=pb.SamplingParams(top_p=0)), INVALID, "top_p"),
    ("top_p above one", _req(sampling=pb.SamplingParams(top_p=1.5)), INVALID, "top_p"),
    ("top_k below -1", _req(sampling=pb.SamplingParams(top_k=-5)), INVALID, "top_k"),
    ("min_p above one", _req(sampling=pb.SamplingParams(min_p=2)), INVALID, "min_p"),
    ("max_tokens zero", _req(sampling=pb.SamplingParams(max_tokens=0)), INVALID, "max_tokens"),
    (
        "min_tokens over max_tokens",
        _req(sampling=pb.SamplingParams(max_tokens=4, min_tokens=9)),
        INVALID,
        "min_tokens",
    ),
    ("n zero", _req(sampling=pb.SamplingParams(n=0)), INVALID, "n must"),
    ("logprobs 21", _req(sampling=pb.SamplingParams(logprobs=21)), INVALID, "logprobs"),
    ("presence_penalty 3", _req(sampling=pb.SamplingParams(presence_penalty=3)), INVALID, "presence_penalty"),
    (
        "frequency_penalty -3",
        _req(sampling=pb.SamplingParams(frequency_penalty=-3)),
        INVALID,
        "frequency_penalty",
    ),
    (
        "repetition_penalty 0",
        _req(sampling=pb.SamplingParams(repetition_penalty=0)),
        INVALID,
        "repetition_penalty",
    ),
    ("empty stop string", _req(sampling=pb.SamplingParams(stop=["ok", ""])), INVALID, "stop"),
    (
        "stop token beyond vocab",
        _req(sampling=pb.SamplingParams(stop_token_ids=[10**7])),
        INVALID,
        "stop_token_ids",
    ),
    (
        "logit_bias beyond vocab",
        _req(sampling=pb.SamplingParams(logit_bias={10**7: 1.0})),
        INVALID,
        "logit_bias",
    ),
    (
        "message over max size",
        _req(prompt="x" * (MAX_MESSAGE_BYTES + 10)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_request_status(gen: pb_grpc.GenerationStub, case: tuple) -> None:
    _, request, code, words = case
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(gen.Generate(request))
    assert err.value.code() == code, err.value.details()
    assert words in (err.value.details() or ""), err.value.details()
    assert "Traceback" not in (err.value.details() or "")


async def test_still_serving_after_bad_requests(
    channel: grpc.aio.Channel, gen: pb_grpc.GenerationStub, control: ipb_grpc.WorkerControlStub
) -> None:
    for _, request, _, _ in BAD_REQUESTS:
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(gen.Generate(request))
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "llmserve.v1.Generation"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    got = await collect(gen.Generate(_req(sampling=greedy(4))))
    assert len(got.token_ids[0]) == 4 and got.finish[0] == "length"
    await wait_idle(control)


# -- other RPCs -----------------------------------------------------------------------------


async def test_list_models_and_worker_info(
    gen: pb_grpc.GenerationStub, control: ipb_grpc.WorkerControlStub, worker: WorkerServer
) -> None:
    models = await gen.ListModels(pb.ListModelsRequest())
    assert [(m.name, m.max_model_len, m.num_workers) for m in models.models] == [(SERVED_NAME, 512, 1)]
    (model,) = models.models
    assert (model.quantization, model.kv_cache_dtype, model.kv_cache_tokens) == ("none", "auto", 512 * 16)
    assert model.weight_bytes == worker.service.engine.weight_bytes > 0
    info = await control.GetWorkerInfo(ipb.GetWorkerInfoRequest())
    assert info.model == SERVED_NAME and info.block_size == 16 and info.max_model_len == 512
    assert info.worker_id == worker.service.worker_id and not info.draining
    assert info.load.num_kv_blocks == 512 and info.load.max_num_seqs == 128


async def test_get_tokenizer_rebuilds_the_same_tokenizer(
    control: ipb_grpc.WorkerControlStub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    reply = await control.GetTokenizer(ipb.GetTokenizerRequest())
    assert reply.model == SERVED_NAME and "tokenizer.json" in reply.files
    for name, content in reply.files.items():
        (tmp_path / name).write_bytes(content)
    rebuilt = AutoTokenizer.from_pretrained(tmp_path)
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Hello, wörld! 12345"
    assert rebuilt.encode(text) == original.encode(text)
    chat = [{"role": "user", "content": "Hi"}]
    assert rebuilt.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(
        chat, tokenize=False
    )


async def test_reflection_lists_both_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"llmserve.v1.Generation", "llmserve.v1.WorkerControl", "grpc.health.v1.Health"} <= names
