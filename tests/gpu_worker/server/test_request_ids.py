"""A request id reused as soon as its stream ended (found by the fuzzing of tests/chaos/): the
stop string that ended the first stream is found by the front, whose abort reaches the core after
the core computed one more token for it, and that token must not land in the new request."""

from __future__ import annotations

import pytest

from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _request(sampling: pb.SamplingParams, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(model=SERVED_NAME, prompt="0..0", sampling=sampling, request_id=request_id)


async def test_a_reused_request_id_gets_only_its_own_tokens(gen: pb_grpc.GenerationStub) -> None:
    sampling = pb.SamplingParams(max_tokens=12, temperature=1.0, seed=10250362746, min_p=0.7)
    alone = await collect(gen.Generate(_request(sampling)))
    text = alone.text[0]
    assert len(text) > 4
    sampling.stop.append(text[2:4])  # ends each stream by a stop string, found by the front
    expected = await collect(gen.Generate(_request(sampling)))
    assert expected.finish == {0: "stop"}
    for _ in range(6):
        again = await collect(gen.Generate(_request(sampling, request_id="same-id")))
        assert again.token_ids == expected.token_ids and again.text == expected.text
