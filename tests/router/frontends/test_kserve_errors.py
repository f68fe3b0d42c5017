"""Bad input through the KServe v2 door gets INVALID_ARGUMENT (unary calls) or the request's
``error_message`` (streams, which stay open for the next request), sent by ``tritonclient`` or,
for malformed tensors a client library would refuse to build, by its generated stubs; the router
keeps serving."""

from __future__ import annotations

import queue
import struct
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.router.frontends.kserve_inputs import bool_input, is_final, text_inputs, texts
from tests.router.frontends.stack_proc import MODEL, StackProc

PROMPT = "Hello"
OK = {"max_tokens": 2, "temperature": 0}


def _int_input(name: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "INT32")
    tensor.set_data_from_numpy(np.array([7], dtype=np.int32))
    return tensor


def _two_prompts() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text_input", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    return tensor


def _sampling(params: dict[str, Any] | str) -> Any:
    return lambda: text_inputs(PROMPT, sampling=params)


BAD_INFERS: list[tuple[str, Any, list[str]]] = [
    ("sampling_parameters not JSON", _sampling("{max_tokens: 2"), ["not valid JSON"]),
    ("sampling_parameters not an object", _sampling("[1, 2]"), ["JSON object"]),
    ("sampling_parameters nested too deeply", _sampling("[" * 100_000), ["sampling_parameters", "nested"]),
    ("unknown sampling parameter", _sampling({"beam_width": 2}), ["beam_width"]),
    ("temperature not a number", _sampling({"temperature": "hot"}), ["temperature"]),
    ("max_tokens zero", _sampling({"max_tokens": 0}), ["max_tokens"]),
    ("n not an integer", _sampling({"n": "two"}), ["n ="]),
    ("max_tokens fractional", _sampling({"max_tokens": 2.5}), ["max_tokens"]),
    ("stop not strings", _sampling({"stop": [1, 2]}), ["stop"]),
    ("logit_bias not an object", _sampling({"logit_bias": [1]}), ["logit_bias"]),
    ("ignore_eos not a boolean", _sampling({"ignore_eos": "maybe"}), ["ignore_eos"]),
    # ranges are the worker's to check; the router passes its INVALID_ARGUMENT through
    ("negative temperature", _sampling({"temperature": -1}), ["temperature"]),
    ("top_p over 1", _sampling({"top_p": 2}), ["top_p"]),
    ("logit_bias outside the vocabulary", _sampling({"logit_bias": {"999999": 1}}), ["logit_bias"]),
    ("no text_input", lambda: [bool_input("stream", False)], ["text_input"]),
    ("empty text_input", lambda: text_inputs(b""), ["text_input"]),
    ("text_input not UTF-8", lambda: text_inputs(b"\xff\xfe"), ["UTF-8"]),
    ("text_input of the wrong type", lambda: [_int_input("text_input")], ["BYTES"]),
    ("two prompts", lambda: [_two_prompts()], ["exactly one"]),
    ("unknown input", lambda: [*text_inputs(PROMPT), _int_input("image")], ["image"]),
    ("stream=true on unary ModelInfer", lambda: text_inputs(PROMPT, stream=True), ["ModelStreamInfer"]),
]


@pytest.fixture(scope="module")
def triton(stack: StackProc) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(stack.grpc_target)


@pytest.mark.parametrize(("make_inputs", "words"), [case[1:] for case in BAD_INFERS],
                         ids=[case[0] for case in BAD_INFERS])
def test_bad_infer_is_invalid_argument(triton: grpcclient.InferenceServerClient, make_inputs: Any,
                                       words: list[str]) -> None:
    with pytest.raises(InferenceServerException) as failure:
        triton.infer(MODEL, make_inputs())
    assert failure.value.status() == "StatusCode.INVALID_ARGUMENT", failure.value
    assert all(w in failure.value.message() for w in words), failure.value.message()


def test_unknown_output_is_invalid_argument(triton: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as failure:
        triton.infer(MODEL, text_inputs(PROMPT, sampling=OK),
                     outputs=[grpcclient.InferRequestedOutput("logits")])
    assert failure.value.status() == "StatusCode.INVALID_ARGUMENT" and "logits" in failure.value.message()


@pytest.mark.parametrize("name", ["no-such-model", "m" * 20_000], ids=["short", "20k characters"])
def test_unknown_model_is_not_found(triton: grpcclient.InferenceServerClient, name: str) -> None:
    """A long name is cut in the message: echoed whole it pushed the trailers past the client's
    metadata limit, and the client saw RESOURCE_EXHAUSTED instead."""
    for call in (lambda: triton.infer(name, text_inputs(PROMPT, sampling=OK)),
                 lambda: triton.get_model_metadata(name)):
        with pytest.raises(InferenceServerException) as failure:
            call()
        assert failure.value.status() == "StatusCode.NOT_FOUND", failure.value.message()
        assert len(failure.value.message()) < 1000


def _raw_request(**fields: Any) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL, **fields)
    return request


def _text_tensor(shape: list[int]) -> service_pb2.ModelInferRequest.InferInputTensor:
    return service_pb2.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=shape)


MALFORMED: list[tuple[str, Any]] = [
    ("raw contents for fewer inputs", lambda: _raw_request(
        inputs=[_text_tensor([1]), service_pb2.ModelInferRequest.InferInputTensor(
            name="stream", datatype="BOOL", shape=[1])],
        raw_input_contents=[struct.pack("<I", 5) + b"Hello"])),
    ("truncated BYTES element", lambda: _raw_request(
        inputs=[_text_tensor([1])], raw_input_contents=[struct.pack("<I", 50) + b"Hello"])),
    ("shape not matching the data", lambda: _raw_request(
        inputs=[_text_tensor([3])], raw_input_contents=[struct.pack("<I", 5) + b"Hello"])),
    ("a shape past the model's", lambda: _raw_request(
        inputs=[_text_tensor([1_000_000_000])], raw_input_contents=[struct.pack("<I", 5) + b"Hello"])),
    # 4M empty elements (16 MB) under a shape of one: read no further than the second (the
    # whole buffer had held the router's event loop for about a second)
    ("millions of elements under a shape of one", lambda: _raw_request(
        inputs=[_text_tensor([1])], raw_input_contents=[b"\0\0\0\0" * 4_000_000])),
    ("input given twice", lambda: _raw_request(
        inputs=[_text_tensor([1]), _text_tensor([1])],
        raw_input_contents=[struct.pack("<I", 1) + b"a", struct.pack("<I", 1) + b"b"])),
]


@pytest.mark.parametrize("make_request", [case[1] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_tensor_is_invalid_argument(stack: StackProc, make_request: Any) -> None:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(make_request(), timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failure.value  # type: ignore[attr-defined]


def test_typed_contents_are_read_too(stack: StackProc) -> None:
    """Inputs given as typed ``contents`` rather than raw bytes (clients other than tritonclient)."""
    tensor = _text_tensor([1])
    tensor.contents.bytes_contents.append(PROMPT.encode())
    with grpc.insecure_channel(stack.grpc_target) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _raw_request(inputs=[tensor],
                         parameters={"max_tokens": service_pb2.InferParameter(int64_param=2)}),
            timeout=60)
    assert reply.outputs[0].name == "text_output" and reply.raw_output_contents[0]


def test_stream_errors_are_per_request(triton: grpcclient.InferenceServerClient, stack: StackProc) -> None:
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        bad = [
            text_inputs(PROMPT, stream=True, sampling={"n": 2}),  # n > 1 cannot stream
            text_inputs(PROMPT, stream=True, sampling={"temperature": -1}),
            text_inputs(b"", stream=True),
        ]
        for inputs in bad:
            triton.async_stream_infer(MODEL, inputs)
            result, error = received.get(timeout=60)
            assert result is None and isinstance(error, InferenceServerException) and error.message()
        triton.async_stream_infer(MODEL, text_inputs(PROMPT, stream=False, sampling=OK, flags=(
            "exclude_input_in_output",)))
        result, error = received.get(timeout=60)
        assert error is None and is_final(result) and len(texts(result)) == 1
    finally:
        triton.stop_stream()
    assert triton.is_server_live() and stack.proc.poll() is None
