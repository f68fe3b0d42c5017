"""A worker serving a model without a tokenizer, alone and behind a router on the memory store.

Token-id requests stream token ids with empty text (through the router too, which then needs
no tokenizer); text prompts get INVALID_ARGUMENT; GetTokenizer answers FAILED_PRECONDITION.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet import open_store
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from router.server import RouterConfig, RouterServer
from tests.gpu_worker.server.worker_server_helpers import collect, free_port, greedy
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "bare"
IDS = [1, 504, 3458, 282, 4649, 314]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def targets(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, str]]:
    """(worker target, router target): a dummy-weights model whose folder has no tokenizer."""
    model_dir = make_tiny_model("llama", tmp_path_factory.mktemp("bare-server"))
    store = open_store(None)
    port = free_port()
    config = EngineConfig(model=str(model_dir), served_model_name=MODEL, load_format="dummy",
                          num_kv_blocks=128, max_num_seqs=8)
    worker = WorkerServer(config, ServerConfig(host="127.0.0.1", port=port, drain_grace_s=0.1,
                                               advertise_address=f"127.0.0.1:{port}"), fleet_store=store)
    await worker.start()
    await worker.wait_ready()
    router = RouterServer(RouterConfig(port=free_port()), store)
    await router.start()
    yield worker.target, router.target
    await router.stop(grace_s=0.1)
    await worker.drain(0.1)
    await store.close()


@pytest.mark.parametrize("via", ["worker", "router"])
async def test_token_ids_stream_without_text(targets: tuple[str, str], via: str) -> None:
    target = targets[0] if via == "worker" else targets[1]
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(model=MODEL, prompt_token_ids=pb.TokenIds(ids=IDS), sampling=greedy(9))
        )
        out = await collect(call)
    assert len(out.token_ids[0]) == 9 and out.text[0] == "" and out.finish[0] == "length"
    assert out.last.usage.prompt_tokens == len(IDS)


@pytest.mark.parametrize("via", ["worker", "router"])
@pytest.mark.parametrize("request_", [
    pb.GenerateRequest(model=MODEL, prompt="hello", sampling=greedy(4)),
    pb.GenerateRequest(model=MODEL, sampling=greedy(4),
                       messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])),
], ids=["text", "chat"])
async def test_text_prompts_are_invalid(
    targets: tuple[str, str], via: str, request_: pb.GenerateRequest
) -> None:
    target = targets[0] if via == "worker" else targets[1]
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(pb_grpc.GenerationStub(channel).Generate(request_))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this model has no tokenizer: send prompt_token_ids" in (err.value.details() or "")


async def test_stop_strings_are_invalid(targets: tuple[str, str]) -> None:
    sampling = pb.SamplingParams(max_tokens=4, stop=["\n"])
    async with grpc.aio.insecure_channel(targets[0]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=IDS), sampling=sampling)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop" in (err.value.details() or "")


async def test_get_tokenizer_is_a_failed_precondition(targets: tuple[str, str]) -> None:
    async with grpc.aio.insecure_channel(targets[0]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ipb_grpc.WorkerControlStub(channel).GetTokenizer(ipb.GetTokenizerRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "without a tokenizer" in (err.value.details() or "")
