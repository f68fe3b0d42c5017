"""The official ``tritonclient[grpc]`` (sync and asyncio) against the router's KServe v2 door of a
real ``llmserve up`` stack: health and metadata, unary ``infer``, streaming with
``sampling_parameters`` JSON through ``start_stream``/``async_stream_infer`` and
``tritonclient.grpc.aio.stream_infer``, the final-response flag, cancellation; greedy text equals
the same request through ``llmserve.v1.Generation``."""

from __future__ import annotations

import queue
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio

from llmserve.client import Client
from tests.helpers.otlp_receiver import OtlpReceiver
from tests.router.frontends.kserve_inputs import is_final, text_inputs, texts
from tests.router.frontends.stack_proc import MODEL, StackProc

PROMPT = "In a hole in the ground there lived"
GREEDY = {"max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def triton(stack: StackProc) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(stack.grpc_target)


def _native(stack: StackProc, **kwargs: Any) -> str:
    with Client(stack.grpc_target) as native:
        return native.complete(MODEL, prompt=PROMPT, **kwargs).text


def test_health_and_metadata(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and not triton.is_model_ready("no-such-model")
    meta = triton.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["text_input"] == "BYTES"
    assert [o["name"] for o in meta["outputs"]] == ["text_output", "finish_reason", "num_output_tokens"]
    assert triton.get_server_metadata(as_json=True)["name"] == "llmserve"


def test_unary_infer_matches_native(triton: grpcclient.InferenceServerClient, stack: StackProc) -> None:
    native = _native(stack, max_tokens=8, temperature=0.0)
    result = triton.infer(MODEL, text_inputs(PROMPT, sampling=GREEDY), request_id="r-1")
    assert texts(result) == [PROMPT + native]  # the backend's default: prompt + completion
    assert result.get_response().id == "r-1"
    excluded = triton.infer(MODEL, text_inputs(PROMPT, sampling={"max_tokens": "8", "temperature": "0"},
                                               flags=("exclude_input_in_output", "return_finish_reason",
                                                      "return_num_output_tokens")))
    assert texts(excluded) == [native]  # string values, as the backend's examples send them
    assert texts(excluded, "finish_reason") == ["length"]
    assert excluded.as_numpy("num_output_tokens").tolist() == [8]


def test_unary_infer_with_n2_returns_both(triton: grpcclient.InferenceServerClient) -> None:
    result = triton.infer(MODEL, text_inputs(PROMPT, sampling={"n": 2, "max_tokens": 3, "seed": 5},
                                             flags=("exclude_input_in_output", "return_num_output_tokens")))
    assert len(texts(result)) == 2 and result.as_numpy("num_output_tokens").tolist() == [3, 3]


def test_sync_stream_matches_native(triton: grpcclient.InferenceServerClient, stack: StackProc) -> None:
    native = _native(stack, max_tokens=8, temperature=0.0)
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        triton.async_stream_infer(MODEL, text_inputs(PROMPT, stream=True, sampling=GREEDY,
                                                     flags=("return_finish_reason",)), request_id="s-1")
        deltas, finishes = [], []
        while True:
            result, error = received.get(timeout=60)
            assert error is None, error
            assert result.get_response().id == "s-1"
            deltas += texts(result)
            finishes += texts(result, "finish_reason")
            if is_final(result):
                break
        assert "".join(deltas) == native and len(deltas) > 1  # one response per chunk
        assert finishes[-1] == "length" and set(finishes[:-1]) <= {"None"}
        # a whole (non-streamed) request on the same stream: one final response
        triton.async_stream_infer(MODEL, text_inputs(PROMPT, stream=False, sampling=GREEDY), request_id="s-2")
        result, error = received.get(timeout=60)
        assert error is None and is_final(result) and texts(result) == [PROMPT + native]
    finally:
        triton.stop_stream()


async def test_aio_stream_infer_concurrent_requests(stack: StackProc) -> None:
    native = _native(stack, max_tokens=8, temperature=0.0)
    client = grpcclient_aio.InferenceServerClient(stack.grpc_target)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(3):
            yield {"model_name": MODEL, "request_id": f"a-{i}",
                   "inputs": text_inputs(PROMPT, stream=True, sampling=GREEDY)}

    by_id: dict[str, str] = {}
    finals = 0
    async for result, error in client.stream_infer(requests()):
        assert error is None, error
        rid = result.get_response().id
        by_id[rid] = by_id.get(rid, "") + "".join(texts(result))
        finals += is_final(result)
        if finals == 3:
            break
    assert by_id == {f"a-{i}": native for i in range(3)}
    assert await client.is_model_ready(MODEL)
    await client.close()


def _cancelled_kserve_requests(receiver: OtlpReceiver) -> set[str]:
    return {str(s.attributes.get("llmserve.request.id")) for s in receiver.spans()
            if s.name == "llmserve.worker.generate" and "cancelled" in s.events
            and str(s.attributes.get("llmserve.request.id", "")).startswith("kserve-")}


def _wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return result


def test_stopping_the_stream_cancels_on_the_worker(triton: grpcclient.InferenceServerClient,
                                                   otlp_receiver: OtlpReceiver) -> None:
    before = _cancelled_kserve_requests(otlp_receiver)
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: received.put((result, error)))
    long_run = {"max_tokens": 480, "ignore_eos": True, "temperature": 0}
    triton.async_stream_infer(MODEL, text_inputs(PROMPT, stream=True, sampling=long_run))
    result, error = received.get(timeout=60)
    assert error is None and not is_final(result)
    triton.stop_stream(cancel_requests=True)
    _wait_for(lambda: _cancelled_kserve_requests(otlp_receiver) - before, "the worker never saw the cancel")


async def test_aio_cancel_cancels_on_the_worker(stack: StackProc, otlp_receiver: OtlpReceiver) -> None:
    before = _cancelled_kserve_requests(otlp_receiver)
    client = grpcclient_aio.InferenceServerClient(stack.grpc_target)

    async def one() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": MODEL, "inputs": text_inputs(
            PROMPT, stream=True, sampling={"max_tokens": 480, "ignore_eos": True})}

    responses = client.stream_infer(one())
    async for _result, error in responses:
        assert error is None
        break
    responses.cancel()
    _wait_for(lambda: _cancelled_kserve_requests(otlp_receiver) - before, "the worker never saw the cancel")
    await client.close()
