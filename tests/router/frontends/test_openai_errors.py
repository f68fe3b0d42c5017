"""Bad input through the OpenAI door gets HTTP 400 with OpenAI's error JSON naming the parameter
(404 for an unknown model), through plain HTTP and the official SDK, and never hurts the router;
a client that disconnects mid-stream cancels its request on the worker. The HTTP statuses of the
other router errors (429, 503, 504) are checked on the mapping itself."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import grpc
import openai
import pytest

from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from router.errors import ModelUnavailable, UpstreamError, WorkersBusy
from router.frontends.openai_errors import http_error
from tests.helpers.otlp_receiver import OtlpReceiver
from tests.router.frontends.stack_proc import MODEL, StackProc, http_json

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
_P = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
_C = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

BAD_REQUESTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("negative temperature", COMPLETIONS, {**_P, "temperature": -1}, "temperature"),
    ("temperature not a number", COMPLETIONS, {**_P, "temperature": "hot"}, "temperature"),
    ("top_p zero", COMPLETIONS, {**_P, "top_p": 0}, "top_p"),
    ("n zero", COMPLETIONS, {**_P, "n": 0}, "n"),
    ("max_tokens zero", COMPLETIONS, {**_P, "max_tokens": 0}, "max_tokens"),
    ("logprobs over 20", COMPLETIONS, {**_P, "logprobs": 21}, "logprobs"),
    ("no prompt", COMPLETIONS, {"model": MODEL}, "prompt"),
    ("empty prompt", COMPLETIONS, {**_P, "prompt": ""}, "prompt"),
    ("more prompts than max_batch_prompts", COMPLETIONS, {**_P, "prompt": ["a"] * 129}, "prompt"),
    ("an empty prompt in a batch", COMPLETIONS, {**_P, "prompt": ["a", ""]}, "prompt"),
    ("a batch prompt longer than the context", COMPLETIONS, {**_P, "prompt": [[5], [5] * 600]}, "prompt"),
    ("suffix", COMPLETIONS, {**_P, "suffix": "end"}, "suffix"),
    ("prompt_logprobs with stream", COMPLETIONS, {**_P, "prompt_logprobs": 1, "stream": True},
     "prompt_logprobs"),
    ("prompt_logprobs over 20", CHAT, {**_C, "prompt_logprobs": 21}, "prompt_logprobs"),
    ("presence_penalty over 2", COMPLETIONS, {**_P, "presence_penalty": 3}, "presence_penalty"),
    ("frequency_penalty under -2", COMPLETIONS, {**_P, "frequency_penalty": -5}, "frequency_penalty"),
    ("logit_bias over 100", COMPLETIONS, {**_P, "logit_bias": {"5": 200}}, "logit_bias"),
    ("empty stop string", COMPLETIONS, {**_P, "stop": [""]}, "stop"),
    ("negative seed", COMPLETIONS, {**_P, "seed": -1}, "seed"),
    ("min_tokens over max_tokens", COMPLETIONS, {**_P, "min_tokens": 5}, "min_tokens"),
    ("top_k under -1", COMPLETIONS, {**_P, "top_k": -2}, "top_k"),
    ("negative token id", COMPLETIONS, {**_P, "prompt": [1, -2]}, "prompt"),
    # refused by the worker, passed through by the router, named by the door
    ("logit_bias outside the vocabulary", COMPLETIONS, {**_P, "logit_bias": {"999999": 1}}, "logit_bias"),
    ("prompt longer than the context", COMPLETIONS, {**_P, "prompt": [5] * 600}, "prompt"),
    ("no messages", CHAT, {**_C, "messages": []}, "messages"),
    ("message without role", CHAT, {**_C, "messages": [{"content": "Hi"}]}, "messages[0].role"),
    ("image content part", CHAT,
     {**_C, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ("top_logprobs without logprobs", CHAT, {**_C, "top_logprobs": 2}, "top_logprobs"),
    ("continue_final_message with the generation prompt", CHAT, {**_C, "continue_final_message": True},
     "continue_final_message"),
    ("tools not functions", CHAT, {**_C, "tools": [{"type": "retrieval"}], "tool_choice": "none"}, "tools"),
    ("chat_template_kwargs reserved", CHAT, {**_C, "chat_template_kwargs": {"tokenize": True}},
     "chat_template_kwargs"),
    ("tool_choice names no tool", CHAT, {**_C, "tools": [{"type": "function", "function": {"name": "f"}}],
                                         "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice"),
    ("unknown response_format", CHAT, {**_C, "response_format": {"type": "xml"}}, "response_format"),
    ("json_schema without a schema", COMPLETIONS, {**_P, "response_format": {"type": "json_schema"}},
     "response_format"),
    ("two formats", CHAT, {**_C, "guided_regex": "a+", "response_format": {"type": "json_object"}},
     "guided_regex"),
    ("max_completion_tokens zero", CHAT, {**_C, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("stream_options without stream", CHAT, {**_C, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("top_logprobs over 20", CHAT, {**_C, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    # past what the worker's message fields hold (uint32 counts, int32 token ids)
    ("max_tokens 2^32", COMPLETIONS, {**_P, "max_tokens": 2**32}, "max_tokens"),
    ("min_tokens 2^32", COMPLETIONS, {**_P, "max_tokens": None, "min_tokens": 2**32}, "min_tokens"),
    ("top_k 2^31", COMPLETIONS, {**_P, "top_k": 2**31}, "top_k"),
    ("logit_bias key 2^31", COMPLETIONS, {**_P, "logit_bias": {str(2**31): 1}}, "logit_bias"),
    ("stop_token_ids 2^31", COMPLETIONS, {**_P, "stop_token_ids": [2**31]}, "stop_token_ids"),
    ("allowed_token_ids -1", COMPLETIONS, {**_P, "allowed_token_ids": [-1]}, "allowed_token_ids"),
    ("bad_words blank", COMPLETIONS, {**_P, "bad_words": [" "]}, "bad_words"),
    ("prompt token id 2^31", COMPLETIONS, {**_P, "prompt": [2**31]}, "prompt"),
    ("max_completion_tokens 2^32", CHAT, {**_C, "max_completion_tokens": 2**32}, "max_completion_tokens"),
    # a lone UTF-16 surrogate is no Unicode character: no tokenizer takes it
    ("lone surrogate in the prompt", COMPLETIONS, {**_P, "prompt": "Hi \ud800"}, "prompt"),
    ("lone surrogate in a message", CHAT, {**_C, "messages": [{"role": "user", "content": "\udc00"}]},
     "messages"),
]


@pytest.mark.parametrize(("path", "body", "param"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_parameter_is_400_naming_it(stack: StackProc, path: str, body: dict[str, Any],
                                        param: str) -> None:
    # streamed or not, the request fails before its first token: a plain 400 either way
    variants = [body] if "stream_options" in body else [body, {**body, "stream": True}]
    for variant in variants:
        status, reply = http_json("POST", stack.http_url + path, variant)
        assert status == 400, reply
        error = reply["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param or error["param"].startswith(param), error


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"[" * 100_000],
                         ids=["not json", "not an object", "empty", "nested too deeply"])
def test_malformed_body_is_400(stack: StackProc, body: bytes) -> None:
    status, reply = http_json("POST", stack.http_url + CHAT, body)
    assert status == 400 and reply["error"]["param"] == "body", reply


def test_unknown_model_is_404(stack: StackProc) -> None:
    status, reply = http_json("POST", stack.http_url + COMPLETIONS, {**_P, "model": "no-such-model"})
    assert status == 404, reply
    assert reply["error"]["code"] == "model_not_found" and reply["error"]["param"] == "model"


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nope", 404), ("GET", COMPLETIONS, 405)])
def test_routing_errors_are_openai_errors(stack: StackProc, method: str, path: str, status: int) -> None:
    got, reply = http_json(method, stack.http_url + path)
    assert got == status and isinstance(reply, dict), reply
    assert path in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error", reply


def test_sdk_raises_its_typed_errors(stack: StackProc) -> None:
    client = openai.OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       temperature=5)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi", stream=True)
    # and the router still serves
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"
    assert stack.proc.poll() is None


def test_status_mapping_of_router_errors() -> None:
    assert http_error(WorkersBusy(MODEL)).status == 429
    assert http_error(ModelUnavailable(MODEL)).status == 503
    assert http_error(UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "late")).status == 504
    internal = http_error(RuntimeError("secret detail"))
    assert internal.status == 500 and "secret" not in json.dumps(internal.body)


def _worker_idle(stack: StackProc) -> bool:
    with grpc.insecure_channel(stack.worker_target) as channel:
        info = int_grpc.WorkerControlStub(channel).GetWorkerInfo(int_pb.GetWorkerInfoRequest(), timeout=10)
    return info.load.num_running == 0 and info.load.num_waiting == 0


def _wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_client_disconnect_aborts_the_request_on_the_worker(stack: StackProc,
                                                           otlp_receiver: OtlpReceiver) -> None:
    body = {**_P, "max_tokens": 480, "stream": True, "ignore_eos": True, "temperature": 0}
    connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=60)
    connection.request("POST", COMPLETIONS, json.dumps(body), {"content-type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200
    first = reply.readline()
    request_id = json.loads(first.removeprefix(b"data: "))["id"]
    connection.close()  # mid-stream: the 480 tokens are far from done

    def cancelled_on_worker() -> bool:
        return any(s.name == "llmserve.worker.generate" and "cancelled" in s.events
                   and s.attributes.get("llmserve.request.id") == request_id for s in otlp_receiver.spans())

    _wait_for(cancelled_on_worker, "the worker never saw the request cancelled")
    _wait_for(lambda: _worker_idle(stack), "the worker still runs the request")


def test_disconnect_before_a_whole_response_aborts_too(stack: StackProc, otlp_receiver: OtlpReceiver) -> None:
    def cancelled() -> set[str]:
        return {str(s.attributes.get("llmserve.request.id")) for s in otlp_receiver.spans()
                if s.name == "llmserve.worker.generate" and "cancelled" in s.events
                and str(s.attributes.get("llmserve.request.id", "")).startswith("cmpl-")}

    before = cancelled()
    body = {**_P, "max_tokens": 480, "ignore_eos": True, "temperature": 0}  # not streamed
    connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=60)
    connection.request("POST", COMPLETIONS, json.dumps(body), {"content-type": "application/json"})
    _wait_for(lambda: not _worker_idle(stack), "the request never reached the worker")
    connection.close()  # gone before the whole response exists
    _wait_for(lambda: cancelled() - before, "the worker never saw the request cancelled")
    _wait_for(lambda: _worker_idle(stack), "the worker still runs the request")


def test_disconnect_during_a_batch_aborts_every_prompt(stack: StackProc, otlp_receiver: OtlpReceiver) -> None:
    body = {**_P, "prompt": ["Hello", "Hi there", "Once"], "max_tokens": 480, "stream": True,
            "ignore_eos": True, "temperature": 0}
    connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=60)
    connection.request("POST", COMPLETIONS, json.dumps(body), {"content-type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200
    request_id = json.loads(reply.readline().removeprefix(b"data: "))["id"]
    connection.close()  # mid-stream: three prompts of 480 tokens each are far from done

    def cancelled_on_worker() -> set[str]:
        return {str(s.attributes.get("llmserve.request.id")) for s in otlp_receiver.spans()
                if s.name == "llmserve.worker.generate" and "cancelled" in s.events}

    expected = {f"{request_id}-{i}" for i in range(3)}
    _wait_for(lambda: expected <= cancelled_on_worker(), "the worker never saw every prompt cancelled")
    _wait_for(lambda: _worker_idle(stack), "the worker still runs the batch")
