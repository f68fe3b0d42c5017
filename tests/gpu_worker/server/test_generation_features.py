"""Structured output, plug-ins and priority through a real worker's gRPC API (tiny llama): the
proto fields reach the engine, bad formats and unknown plug-ins are INVALID_ARGUMENT naming the
problem, and a high-priority request overtakes queued lower-priority ones."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(engine_config: EngineConfig) -> AsyncIterator[WorkerServer]:
    config = EngineConfig(**{**engine_config.__dict__, "max_num_seqs": 1, "scheduling_policy": "priority"})
    server = WorkerServer(config, ServerConfig(port=0))
    await server.start()
    await server.wait_ready()
    yield server
    await server.drain(0.1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gen(worker: WorkerServer) -> AsyncIterator[pb_grpc.GenerationStub]:
    async with grpc.aio.insecure_channel(worker.target) as channel:
        yield pb_grpc.GenerationStub(channel)


def request(sampling: pb.SamplingParams, **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=SERVED_NAME, prompt="Hello there", sampling=sampling, **kw)  # type: ignore[arg-type]


async def test_structured_output_and_a_stopping_criterion_through_the_proto(
    gen: pb_grpc.GenerationStub,
) -> None:
    regex = pb.SamplingParams(max_tokens=40, temperature=1.0, seed=2,
                              structured_output=pb.StructuredOutput(regex="[a-z]{2,5}=[0-9]{1,2}"))
    on_off = pb.StructuredOutput(choice=pb.ChoiceList(choices=["on", "off"]))
    choice = pb.SamplingParams(max_tokens=10, n=3, temperature=1.0, seed=1, structured_output=on_off)
    schema = {"type": "object", "properties": {"v": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["v"]}
    as_json = pb.SamplingParams(max_tokens=30, temperature=0.0,
                                structured_output=pb.StructuredOutput(json=json.dumps(schema)))
    stop = pb.SamplingParams(max_tokens=60, temperature=1.0, seed=4, ignore_eos=True, stopping_criteria=[
        pb.PluginCall(name="example_max_chars", args_json='{"chars": 12}')])
    calls = [collect(gen.Generate(request(p))) for p in (regex, choice, as_json, stop)]
    r, c, j, s = await asyncio.gather(*calls)
    assert re.fullmatch("[a-z]{2,5}=[0-9]{1,2}", r.text[0]) and r.finish[0] == "stop"
    assert all(c.text[i] in ("on", "off") for i in range(3)) and set(c.finish.values()) == {"stop"}
    assert 1 <= json.loads(j.text[0])["v"] <= 9
    assert len(s.text[0]) >= 12 and s.finish[0] == "stop"
    assert s.chunks[-1].stop_reason == "example_max_chars" or any(
        ch.stop_reason == "example_max_chars" for ch in s.chunks)


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (pb.SamplingParams(structured_output=pb.StructuredOutput(json='{"type": "fancy"}')), '"fancy"'),
        (pb.SamplingParams(structured_output=pb.StructuredOutput(regex="(a")), "structured_output.regex"),
        (pb.SamplingParams(structured_output=pb.StructuredOutput()), "structured_output: set one of"),
        (pb.SamplingParams(logits_processors=[pb.PluginCall(name="os.system")]),
         "'os.system' is not an installed"),
        (pb.SamplingParams(stopping_criteria=[pb.PluginCall(name="example_max_chars", args_json="{bad")]),
         "not valid JSON"),
        (pb.SamplingParams(ignore_eos=True, structured_output=pb.StructuredOutput(regex="a")), "ignore_eos"),
    ],
)
async def test_bad_formats_and_unknown_plugins_are_invalid_argument(
    gen: pb_grpc.GenerationStub, sampling: pb.SamplingParams, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(gen.Generate(request(sampling)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, info.value.details() or ""), info.value.details()


async def test_high_priority_request_overtakes_queued_ones(
    gen: pb_grpc.GenerationStub, worker: WorkerServer
) -> None:
    """One sequence at a time: a long request runs, two low-priority ones queue, then a
    high-priority one arrives and is served right after the running one."""
    long = gen.Generate(request(pb.SamplingParams(max_tokens=400, ignore_eos=True)))
    assert (await long.read()).token_ids  # running now
    finished: list[str] = []

    async def run(name: str, priority: int) -> None:
        await collect(gen.Generate(request(pb.SamplingParams(max_tokens=2, ignore_eos=True),
                                           priority=priority, request_id=name)))
        finished.append(name)

    low = [asyncio.create_task(run(f"low{i}", 5)) for i in range(2)]
    for _ in range(2000):  # until both wait behind the running request
        if worker.service.engine.stats().num_waiting >= 2:
            break
        await asyncio.sleep(0.01)
    high = asyncio.create_task(run("high", -1))
    await asyncio.gather(collect(long), *low, high)
    assert finished[0] == "high", finished
