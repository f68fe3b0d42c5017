"""Admission limits of a real worker (issue 17, findings 1 and 5): each limit refuses with a status
that names the field, the limit and its flag, counts the refusal, and leaves the worker serving.

Finding 1: one ``n=100000`` request became 100k queued sequences and took the worker out of
service; cancelling it did not free the queue. Finding 5: a 1 MB ``request_id``, ``max_tokens =
4294967295`` and a 100,000-turn chat were accepted (the chat after seconds of templating)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.limits import RequestLimits
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect, greedy, wait_idle

pytestmark = pytest.mark.asyncio(loop_scope="module")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclasses.dataclass
class Worker:
    server: WorkerServer
    channel: grpc.aio.Channel

    @property
    def gen(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self.channel)

    @property
    def control(self) -> ipb_grpc.WorkerControlStub:
        return ipb_grpc.WorkerControlStub(self.channel)

    def refusals(self, limit: str) -> float:
        registry = self.server.engine_metrics.metrics.registry
        value = registry.get_sample_value(
            "llmserve:request_refusals_total", {"model_name": SERVED_NAME, "limit": limit}
        )
        return value or 0.0

    async def refused(self, request: pb.GenerateRequest, code: grpc.StatusCode, *words: str) -> str:
        """Send ``request``; assert it is refused with ``code`` and a message holding ``words``."""
        request.model = SERVED_NAME
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(self.gen.Generate(request, timeout=60))
        details = err.value.details() or ""
        assert err.value.code() == code, details
        for word in words:
            assert word in details, details
        return details


def req(**fields: object) -> pb.GenerateRequest:
    """A GenerateRequest for the served model."""
    return pb.GenerateRequest(model=SERVED_NAME, **fields)  # type: ignore[arg-type]


async def _start(config: EngineConfig, server_config: ServerConfig) -> Worker:
    server = WorkerServer(config, server_config)
    await server.start()
    await server.wait_ready()
    return Worker(server, grpc.aio.insecure_channel(server.target))


async def _stop(worker: Worker) -> None:
    await worker.channel.close()
    await worker.server.drain(0.1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(engine_config: EngineConfig) -> AsyncIterator[Worker]:
    """Default limits (max_n 16, max_queue_len 1024, ...)."""
    w = await _start(engine_config, ServerConfig(port=0))
    yield w
    await _stop(w)


# -- finding 1: n and the queue, counted in sequences ---------------------------------------------


async def test_n_of_100000_is_refused_at_once(worker: Worker) -> None:
    before = worker.refusals("max_n")
    await worker.refused(pb.GenerateRequest(prompt="Hello", sampling=greedy(4, n=100000)), INVALID,
                         "n is too large", "100000", "max_n", "--max-n")
    assert worker.refusals("max_n") == before + 1
    info = await worker.control.GetWorkerInfo(ipb.GetWorkerInfoRequest())
    assert info.load.num_waiting == 0 and info.load.num_running == 0
    got = await collect(worker.gen.Generate(req(prompt="Hi",
                                                               sampling=greedy(3))))
    assert len(got.token_ids[0]) == 3


async def test_queue_length_counts_sequences_not_requests(engine_config: EngineConfig) -> None:
    """2 running slots, room for 6 waiting sequences: a second n=4 request does not fit behind
    the first (4 + 4 > 6), however few *requests* wait."""
    config = dataclasses.replace(engine_config, max_num_seqs=2, max_queue_len=6)
    w = await _start(config, ServerConfig(port=0))
    try:
        running = w.gen.Generate(req(prompt="Count:", sampling=greedy(400, n=2)))
        assert (await running.read()).token_ids
        waiting = w.gen.Generate(req(prompt="Wait:", sampling=greedy(4, n=4)))
        await w.control.GetWorkerInfo(ipb.GetWorkerInfoRequest())

        async def queued() -> bool:
            load = (await w.control.GetWorkerInfo(ipb.GetWorkerInfoRequest())).load
            return load.num_waiting == 4

        for _ in range(500):
            if await queued():
                break
            await asyncio.sleep(0.01)
        assert await queued()
        await w.refused(pb.GenerateRequest(prompt="More:", sampling=greedy(4, n=4)), EXHAUSTED,
                        "4 sequences are waiting", "adds 4", "max_queue_len", "--max-queue-len")
        assert w.refusals("max_queue_len") == 1
        # A request larger than the whole queue can never fit: INVALID_ARGUMENT, not "retry".
        await w.refused(pb.GenerateRequest(prompt="All:", sampling=greedy(4, n=7)), INVALID,
                        "needs 7 sequences", "max_queue_len")
        running.cancel()
        assert len((await collect(waiting)).token_ids) == 4
        await wait_idle(w.control)
    finally:
        await _stop(w)


async def test_cancelling_a_huge_request_frees_the_queue_at_once(engine_config: EngineConfig) -> None:
    """The finding-1 scenario with the limits raised on purpose: 20,000 sequences queued by one
    request; the worker keeps answering, and cancelling the call frees every sequence and block
    (aborting k waiting requests was O(k * queue) before)."""
    config = dataclasses.replace(engine_config, max_queue_len=20_000, max_queued_tokens=1 << 22)
    w = await _start(config, ServerConfig(port=0, limits=RequestLimits(max_n=20_000)))
    try:
        call = w.gen.Generate(req(prompt="Go:", sampling=greedy(200, n=20_000)))
        assert (await call.read()).token_ids
        busy = (await w.control.GetWorkerInfo(ipb.GetWorkerInfoRequest(), timeout=10)).load
        assert busy.num_running == 128 and busy.num_waiting > 19_000
        call.cancel()
        for _ in range(6000):  # bounded: 60 s, far more than the one pass it takes
            load = (await w.control.GetWorkerInfo(ipb.GetWorkerInfoRequest(), timeout=10)).load
            if load.num_waiting == 0 and load.num_running == 0:
                break
            await asyncio.sleep(0.01)
        info = await wait_idle(w.control)
        assert info.load.num_free_kv_blocks == info.load.num_kv_blocks
        got = await collect(w.gen.Generate(req(prompt="Hi", sampling=greedy(3))))
        assert len(got.token_ids[0]) == 3
    finally:
        await _stop(w)


async def test_queued_tokens_are_bounded(engine_config: EngineConfig) -> None:
    config = dataclasses.replace(engine_config, max_num_seqs=1, max_queued_tokens=100)
    w = await _start(config, ServerConfig(port=0))
    try:
        running = w.gen.Generate(req(prompt="Count:", sampling=greedy(400)))
        assert (await running.read()).token_ids
        ids = pb.TokenIds(ids=[5] * 60)
        waiting = w.gen.Generate(req(prompt_token_ids=ids, sampling=greedy(2)))
        await asyncio.sleep(0)
        for _ in range(500):
            if (await w.control.GetWorkerInfo(ipb.GetWorkerInfoRequest())).load.num_waiting == 1:
                break
            await asyncio.sleep(0.01)
        await w.refused(pb.GenerateRequest(prompt_token_ids=ids, sampling=greedy(2)), EXHAUSTED,
                        "60 tokens are waiting", "adds 60", "max_queued_tokens", "--max-queued-tokens")
        assert w.refusals("max_queued_tokens") == 1
        running.cancel()
        assert (await collect(waiting)).finish == {0: "length"}
        await wait_idle(w.control)
    finally:
        await _stop(w)


# -- finding 5: request id, max_tokens, chats -----------------------------------------------------


async def test_one_megabyte_request_id_is_refused(worker: Worker) -> None:
    before = worker.refusals("max_request_id_len")
    await worker.refused(pb.GenerateRequest(prompt="Hi", request_id="r" * (1 << 20)), INVALID,
                         "request_id is too large", "1048576 characters", "max_request_id_len",
                         "--max-request-id-len")
    assert worker.refusals("max_request_id_len") == before + 1
    ok = await collect(worker.gen.Generate(req(prompt="Hi",
                                                              request_id="r" * 256, sampling=greedy(2))))
    assert {c.request_id for c in ok.chunks} == {"r" * 256}


async def test_max_tokens_beyond_the_context_is_refused(worker: Worker) -> None:
    """vLLM's rule: prompt + max_tokens must fit max_model_len (512 here); refused, not clamped."""
    before = worker.refusals("max_tokens")
    ids = pb.TokenIds(ids=[7] * 12)
    details = await worker.refused(
        pb.GenerateRequest(prompt_token_ids=ids, sampling=pb.SamplingParams(max_tokens=4294967295)), INVALID,
        "max_tokens is too large: 4294967295", "has 12 tokens", "max_model_len", "512", "at most 500",
        "--max-model-len")
    assert details.startswith("max_tokens")
    await worker.refused(req(prompt_token_ids=ids, sampling=greedy(501)), INVALID, "at most 500")
    assert worker.refusals("max_tokens") == before + 2
    got = await collect(worker.gen.Generate(req(prompt_token_ids=ids,
                                                               sampling=greedy(500))))
    assert len(got.token_ids[0]) == 500  # exactly the context: allowed


async def test_a_100000_turn_chat_is_refused_before_templating(worker: Worker) -> None:
    turns = [pb.ChatMessage(role="user" if i % 2 == 0 else "assistant", content="hi") for i in range(100_000)]
    before = worker.refusals("max_chat_turns")
    await worker.refused(pb.GenerateRequest(messages=pb.ChatMessages(messages=turns)), INVALID,
                         "messages is too large: 100000 turns", "max_chat_turns", "--max-chat-turns")
    assert worker.refusals("max_chat_turns") == before + 1
    await worker.refused(pb.GenerateRequest(prompt="x" * 1_000_001), INVALID,
                         "prompt is too large: 1000001 characters", "max_prompt_chars", "--max-prompt-chars")
    big = [pb.ChatMessage(role="user", content=c * 500_000) for c in "yz"]
    await worker.refused(pb.GenerateRequest(messages=pb.ChatMessages(messages=big)), INVALID,
                         "messages is too large: 1000008 characters", "max_prompt_chars")


async def test_a_chat_over_the_context_names_messages(worker: Worker) -> None:
    """The error names the field the client sent (it named ``prompt`` for a chat before)."""
    turns = [pb.ChatMessage(role="user", content="word " * 150) for _ in range(4)]
    details = await worker.refused(pb.GenerateRequest(messages=pb.ChatMessages(messages=turns)), INVALID,
                                   "messages is too long", "max_model_len")
    assert "prompt" not in details.split(":")[0]
    assert worker.refusals("max_model_len") >= 1


# -- the second probe: stop strings, structured-output formats, non-finite numbers -------------


def _nested_arrays(depth: int) -> str:
    """A JSON schema whose document nests ``depth`` objects (arrays of arrays ... of strings)."""
    return '{"type":"array","items":' * (depth - 1) + '{"type":"string"}' + "}" * (depth - 1)


async def test_stop_strings_are_bounded_in_count_and_characters(worker: Worker) -> None:
    """10^6 stop strings made every token of every request cost 2.5 s (each is looked for after
    every token); 32 strings and 1024 characters pass, one more of either is refused."""
    before = worker.refusals("max_stop_strings"), worker.refusals("max_stop_chars")
    many = greedy(2, stop=[f"s{i}" for i in range(33)])
    await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=many), INVALID,
                         "stop is too large: 33 strings", "max_stop_strings", "--max-stop-strings")
    await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=greedy(2, stop=["x" * 1000, "y" * 25])),
                         INVALID, "stop is too large: 1025 characters", "max_stop_chars", "--max-stop-chars")
    assert (worker.refusals("max_stop_strings"), worker.refusals("max_stop_chars")) == (before[0] + 1,
                                                                                        before[1] + 1)
    stops = [f"zq{i}" for i in range(31)] + ["w" * (1024 - sum(len(f"zq{i}") for i in range(31)))]
    got = await collect(worker.gen.Generate(req(prompt="Hi", sampling=greedy(2, stop=stops))))
    assert len(got.token_ids[0]) == 2


async def test_structured_output_formats_are_bounded_in_size_and_nesting(worker: Worker) -> None:
    """A 15 KB schema nested 600 deep froze the worker's event loop for 20 s (xgrammar's schema
    conversion is about cubic in the depth): the nesting is refused before any conversion, and
    a document too deep for the JSON parser itself is INVALID_ARGUMENT too, not INTERNAL."""
    def fmt(**kind: object) -> pb.SamplingParams:
        return pb.SamplingParams(max_tokens=2, temperature=0.0,
                                 structured_output=pb.StructuredOutput(**kind))  # type: ignore[arg-type]

    before = worker.refusals("max_format_depth")
    # 5,000 bare arrays (10,000 characters) are past the JSON parser's own recursion bound.
    for schema in (_nested_arrays(65), _nested_arrays(600), "[" * 5000 + "]" * 5000):
        await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=fmt(json=schema)), INVALID,
                             "structured_output.json is nested too deeply", "max_format_depth",
                             "--max-format-depth")
    assert worker.refusals("max_format_depth") == before + 3
    await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=fmt(regex="a" * 16385)), INVALID,
                         "structured_output.regex is too large: 16385 characters", "max_format_chars",
                         "--max-format-chars")
    choices = pb.ChoiceList(choices=[f"c{i:05d}" for i in range(11_000)])
    await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=fmt(choice=choices)), INVALID,
                         "structured_output.choice is too large: 66000 characters", "max_format_chars")
    got = await collect(worker.gen.Generate(req(prompt="A list:", sampling=fmt(json=_nested_arrays(64)))))
    assert got.token_ids[0]  # at the limit: served


async def test_non_finite_numbers_and_deep_plugin_args_are_invalid(worker: Worker) -> None:
    await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=greedy(2, logit_bias={5: float("nan")})),
                         INVALID, "logit_bias values must be finite")
    await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=greedy(2, logit_bias={5: float("-inf")})),
                         INVALID, "logit_bias values must be finite")
    hot = pb.SamplingParams(temperature=float("inf"))
    await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=hot), INVALID, "temperature must be finite")
    deep = pb.PluginCall(name="anything", args_json="[" * 100_000 + "]" * 100_000)
    await worker.refused(pb.GenerateRequest(prompt="Hi", sampling=greedy(2, logits_processors=[deep])),
                         INVALID, "args_json", "nested too deeply")


async def test_drain_refuses_a_grace_that_is_not_a_finite_non_negative_number(worker: Worker) -> None:
    """A NaN grace passed the ``< 0`` check and drained the worker."""
    for grace in (float("nan"), float("inf"), -1.0):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await worker.control.Drain(ipb.DrainRequest(grace_period_s=grace))
        assert err.value.code() == INVALID and "grace_period_s" in (err.value.details() or "")
    info = await worker.control.GetWorkerInfo(ipb.GetWorkerInfoRequest())
    assert not info.draining


async def test_still_serving_after_refusals(worker: Worker) -> None:
    got = await collect(worker.gen.Generate(req(prompt="Hello",
                                                               sampling=greedy(4))))
    assert len(got.token_ids[0]) == 4
    await wait_idle(worker.control)
