"""The doors' translation on its own (no server): OpenAI bodies and KServe tensors into the
router's internal request, and back."""

from __future__ import annotations

import json

import pytest

from llmserve.kserve import grpc_service_pb2 as kserve_pb
from llmserve.prompt_input import ChatPrompt
from llmserve.v1 import generation_pb2 as gen_pb
from router.errors import InvalidRequest
from router.frontends.kserve_requests import decode_infer, priority_from, sampling_from
from router.frontends.kserve_tensors import decode_bytes_elements, encode_bytes_elements
from router.frontends.openai_errors import InvalidParam, validation_param
from router.frontends.openai_responses import ChatRenderer, CompletionRenderer
from router.frontends.openai_schemas import ChatCompletionRequest, CompletionRequest, validate


def test_completion_body_becomes_the_internal_request() -> None:
    body = {"model": "m", "prompt": ["Hello"], "max_tokens": 7, "temperature": 0.5, "seed": 3, "n": 2,
            "stop": "x", "logit_bias": {"11": -100}, "logprobs": 2, "top_k": 5, "ignore_eos": True}
    routed = validate(CompletionRequest, body).to_router_request("cmpl-1")
    assert (routed.model, routed.prompt, routed.request_id) == ("m", "Hello", "cmpl-1")
    s = routed.sampling
    assert (s.max_tokens, s.temperature, s.seed, s.n, s.logprobs, s.top_k) == (7, 0.5, 3, 2, 2, 5)
    assert list(s.stop) == ["x"] and dict(s.logit_bias) == {11: -100.0} and s.ignore_eos
    assert not s.HasField("top_p") and not routed.max_tokens_to_context


def test_chat_body_becomes_a_chat_prompt() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}],
            "logprobs": True, "top_logprobs": 4, "add_generation_prompt": False}
    routed = validate(ChatCompletionRequest, body).to_router_request("chatcmpl-1")
    assert routed.prompt == ChatPrompt(({"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "a\nb"}), add_generation_prompt=False)
    assert routed.sampling.logprobs == 4 and routed.max_tokens_to_context  # no max_tokens in chat
    capped = validate(ChatCompletionRequest, {**body, "max_completion_tokens": 9}).to_router_request("c")
    assert capped.sampling.max_tokens == 9 and not capped.max_tokens_to_context


@pytest.mark.parametrize(("loc", "param"), [
    (("temperature",), "temperature"),
    (("messages", 0, "role"), "messages[0].role"),
    (("messages", 1, "content", "str"), "messages[1].content"),
    (("prompt", "list[int]", 3), "prompt[3]"),
])
def test_validation_locations_name_the_parameter(loc: tuple[object, ...], param: str) -> None:
    assert validation_param(loc) == param


def test_invalid_body_names_the_field() -> None:
    with pytest.raises(InvalidParam) as bad:
        validate(CompletionRequest, {"prompt": "x", "top_p": 1.5})
    assert bad.value.param == "top_p"


def _chunk(index: int, text: str, ids: list[int], finish: str = "",
           usage: bool = False) -> gen_pb.GenerateResponse:
    chunk = gen_pb.GenerateResponse(index=index, text=text, token_ids=ids, finish_reason=finish)
    if usage:
        chunk.usage.CopyFrom(gen_pb.Usage(prompt_tokens=5, completion_tokens=3, cached_prompt_tokens=2))
    return chunk


def test_renderers_collect_choices_and_usage() -> None:
    completion = CompletionRenderer("cmpl-1", "m", logprobs=False, include_usage=False, echo="Hi")
    for chunk in (_chunk(1, " b", [4]), _chunk(0, " a", [3]), _chunk(0, "!", [5], "stop"),
                  _chunk(1, "", [], "length", usage=True)):
        completion.add(chunk)
    full = completion.full()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in full["choices"]] == [
        (0, "Hi a!", "stop"), (1, "Hi b", "length")]
    assert full["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    chat = ChatRenderer("chatcmpl-1", "m", logprobs=False, include_usage=True)
    first, last = chat.event(_chunk(0, "a", [3])), chat.event(_chunk(0, "b", [4], "stop", usage=True))
    assert b'"delta":{"role":"assistant","content":"a"}' in first[0]
    assert len(last) == 2 and b'"choices":[]' in last[1] and b'"cached_tokens":2' in last[1]


def test_bytes_tensor_round_trip() -> None:
    values = [b"", b"hello", "héllo".encode()]
    assert decode_bytes_elements(encode_bytes_elements(values), "x") == values
    with pytest.raises(InvalidRequest):
        decode_bytes_elements(b"\x05\x00\x00\x00ab", "x")


def test_sampling_parameters_take_strings_as_the_backend_does() -> None:
    s = sampling_from({"temperature": "0.7", "max_tokens": "12", "ignore_eos": "true", "stop": "###",
                       "top_k": -1, "logit_bias": {"3": "1.5"}})
    assert (round(s.temperature, 3), s.max_tokens, s.ignore_eos, list(s.stop), s.top_k) == (0.7, 12, True,
                                                                                            ["###"], -1)
    assert dict(s.logit_bias) == {3: 1.5}
    assert sampling_from({"truncate_prompt_tokens": "100"}).truncate_prompt_tokens == 100
    assert sampling_from({"truncate_prompt_tokens": -1}).truncate_prompt_tokens == -1
    for bad in ({"n": 0}, {"seed": -1}, {"max_tokens": 2**40}, {"lora_name": "x"}, {"stop": 5},
                {"truncate_prompt_tokens": -2}, {"truncate_prompt_tokens": 2**31}):
        with pytest.raises(InvalidRequest):
            sampling_from(bad)


def test_infer_request_reads_typed_contents_and_request_parameters() -> None:
    request = kserve_pb.ModelInferRequest(model_name="m", id="7")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    text.contents.bytes_contents.append(b"Hi")
    request.parameters["max_tokens"].int64_param = 3
    request.parameters["triton_enable_empty_final_response"].bool_param = True  # reserved: not sampling
    call = decode_infer(request, "kserve-1")
    assert call.routed.prompt == "Hi" and call.routed.sampling.max_tokens == 3
    assert (call.client_id, call.stream, call.prompt_text) == ("7", False, "Hi")
    assert call.outputs == ("text_output",)


def test_openai_formats_priority_and_plugins_become_the_internal_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {"messages": [{"role": "user", "content": "x"}], "priority": -2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
            "logits_processors": ["p", {"name": "q", "args": {"k": [1]}}],
            "stopping_criteria": [{"name": "c"}]}
    routed = validate(ChatCompletionRequest, body).to_router_request("c1")
    s = routed.sampling
    assert routed.priority == -2 and s.structured_output.WhichOneof("kind") == "json"
    assert json.loads(s.structured_output.json) == schema
    assert [(c.name, c.args_json) for c in s.logits_processors] == [("p", ""), ("q", '{"k": [1]}')]
    assert [c.name for c in s.stopping_criteria] == ["c"]
    as_object = validate(CompletionRequest, {"prompt": "x", "response_format": {"type": "json_object"}})
    assert as_object.to_router_request("c2").sampling.structured_output.json_object
    guided = validate(CompletionRequest, {"prompt": "x", "guided_choice": ["a", "b"]}).to_router_request("c3")
    assert list(guided.sampling.structured_output.choice.choices) == ["a", "b"]
    vllm = validate(CompletionRequest, {"prompt": "x", "structured_outputs": {"regex": "[0-9]+"}})
    assert vllm.to_router_request("c4").sampling.structured_output.regex == "[0-9]+"
    text = validate(CompletionRequest, {"prompt": "x", "response_format": {"type": "text"}})
    plain = text.to_router_request("c5")
    assert not plain.sampling.HasField("structured_output") and plain.priority is None


def test_kserve_sampling_parameters_carry_formats_priority_and_plugins() -> None:
    s = sampling_from({"guided_json": {"type": "object"}, "stopping_criteria": [{"name": "c", "args": 3}]})
    assert s.structured_output.json == '{"type": "object"}' and s.stopping_criteria[0].args_json == "3"
    assert sampling_from({"structured_outputs": {"choice": ["x"]}}).structured_output.choice.choices == ["x"]
    with pytest.raises(InvalidRequest, match="structured_outputs"):
        sampling_from({"structured_outputs": {"regex": "a", "choice": ["b"]}})
    with pytest.raises(InvalidRequest, match="only one structured output"):
        sampling_from({"guided_regex": "a", "guided_choice": ["b"]})
    assert priority_from({"priority": "3"}) == 3 and priority_from({}) is None
    with pytest.raises(InvalidRequest, match="priority"):
        priority_from({"priority": 1.5})
