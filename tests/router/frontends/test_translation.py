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
from router.tokenizers import RouterTokenizer


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
    masks = sampling_from({"allowed_token_ids": [5, "6"], "bad_words": ["x y", "z"]})
    assert (list(masks.allowed_token_ids), list(masks.bad_words)) == ([5, 6], ["x y", "z"])
    for bad in ({"n": 0}, {"seed": -1}, {"max_tokens": 2**40}, {"lora_name": "x"}, {"stop": 5},
                {"truncate_prompt_tokens": -2}, {"truncate_prompt_tokens": 2**31},
                {"allowed_token_ids": 5}, {"bad_words": [1]}):
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
    masked = validate(CompletionRequest, {"prompt": "x", "allowed_token_ids": [1, 2], "bad_words": ["no"]})
    s = masked.to_router_request("c6").sampling
    assert (list(s.allowed_token_ids), list(s.bad_words)) == ([1, 2], ["no"])
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


def test_prompt_logprobs_requests_become_the_internal_request() -> None:
    """echo with logprobs N asks the worker for the prompt's logprobs (the larger of N and
    ``prompt_logprobs``); echo with max_tokens 0 generates one token; the refusals name the field."""
    lm_eval = {"prompt": [1, 2, 3], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    s = validate(CompletionRequest, lm_eval).to_router_request("c").sampling
    assert (s.max_tokens, s.logprobs, s.prompt_logprobs) == (1, 1, 1)
    both = validate(CompletionRequest, {**lm_eval, "prompt_logprobs": 4}).to_router_request("c").sampling
    assert both.prompt_logprobs == 4
    assert not validate(CompletionRequest, {"prompt": "x"}).to_router_request("c").sampling.HasField(
        "prompt_logprobs")
    echo_only = validate(CompletionRequest, {**lm_eval, "max_tokens": 0})
    s = echo_only.to_router_request("c").sampling
    assert echo_only.echo_only and s.max_tokens == 1 and s.prompt_logprobs == 1 and not s.HasField("logprobs")
    chat = {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 0}
    assert validate(ChatCompletionRequest, chat).to_router_request("c").sampling.prompt_logprobs == 0
    for schema, body, param in (
        (CompletionRequest, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (CompletionRequest, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        (ChatCompletionRequest, {**chat, "stream": True}, "prompt_logprobs"),
        (CompletionRequest, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ):
        with pytest.raises(InvalidParam) as refused:
            validate(schema, body).to_router_request("c")  # type: ignore[attr-defined]
        assert refused.value.param == param


def _position(token_id: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> gen_pb.TokenLogprobs:
    return gen_pb.TokenLogprobs(token_id=token_id, logprob=logprob, rank=rank,
                                top=[gen_pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top])


# prompt [504, 3458, 282]: positions 2 and 3 with 3 alternatives each (the worker computed the
# larger of the two asks), then one generated token per choice
PROMPT_IDS = [504, 3458, 282]
PROMPT_POSITIONS = [_position(3458, -2.0, 3, [(30, -0.5), (31, -1.0), (3458, -2.0)]),
                    _position(282, -0.25, 1, [(282, -0.25), (32, -3.0), (33, -4.0)])]


def _prompt_chunk() -> gen_pb.GenerateResponse:
    return gen_pb.GenerateResponse(prompt_logprobs=PROMPT_POSITIONS)


def _token_chunk(index: int, usage: bool = False) -> gen_pb.GenerateResponse:
    chunk = _chunk(index, " a", [264], "length", usage=usage)
    chunk.logprobs.append(_position(264, -0.1, 1, [(264, -0.1)]))
    return chunk


def test_completion_renderer_shows_the_prompts_logprobs(smollm2_tokenizer: object) -> None:
    """echo with logprobs 1: the prompt's tokens lead each choice's logprobs (the first null,
    each position's top cut to 1 plus its own token, offsets from the prompt's start); vLLM's
    ``prompt_logprobs`` 2 on each choice; streamed, the prompt's part is in each choice's first
    chunk; echo with max_tokens 0 shows only the prompt."""
    tokenizer = RouterTokenizer(smollm2_tokenizer)
    texts = tokenizer.token_texts([*PROMPT_IDS, 264])
    args = {"logprobs": True, "include_usage": False, "tokenizer": tokenizer, "n": 2,
            "echo": "".join(texts[:3]), "echo_logprobs": 1}
    whole = CompletionRenderer("cmpl-1", "m", prompt_logprobs=2, **args)  # type: ignore[arg-type]
    whole.prompt_token_ids(0, PROMPT_IDS)
    for chunk in (_prompt_chunk(), _token_chunk(0), _token_chunk(1, usage=True)):
        whole.add(chunk)
    choices = whole.full()["choices"]
    for choice in choices:
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == texts
        assert logprobs["token_logprobs"] == [None, -2.0, -0.25, pytest.approx(-0.1)]
        assert logprobs["top_logprobs"][:3] == [None, {texts_of(tokenizer, 30): -0.5, texts[1]: -2.0},
                                                 {texts[2]: -0.25}]
        assert logprobs["text_offset"] == [sum(len(t) for t in texts[:i]) for i in range(4)]
        assert choice["prompt_logprobs"] == [
            None,
            {"3458": {"logprob": -2.0, "rank": 3, "decoded_token": texts[1]},
             "30": {"logprob": -0.5, "rank": 1, "decoded_token": texts_of(tokenizer, 30)},
             "31": {"logprob": -1.0, "rank": 2, "decoded_token": texts_of(tokenizer, 31)}},
            {"282": {"logprob": -0.25, "rank": 1, "decoded_token": texts[2]},
             "32": {"logprob": -3.0, "rank": 2, "decoded_token": texts_of(tokenizer, 32)}},
        ]
        assert choice["text"] == "".join(texts[:3]) + " a"
    streamed = CompletionRenderer("cmpl-2", "m", **args)  # type: ignore[arg-type]
    streamed.prompt_token_ids(0, PROMPT_IDS)
    assert streamed.event(_prompt_chunk()) == []
    for index in (0, 1):
        (event,) = streamed.event(_token_chunk(index))
        body = json.loads(event[len(b"data: "):])
        choice = body["choices"][0]
        assert choice["logprobs"]["tokens"] == texts and "prompt_logprobs" not in choice
    echo_only = CompletionRenderer("cmpl-3", "m", echo_only=True, **{**args, "n": 1})  # type: ignore[arg-type]
    echo_only.prompt_token_ids(0, PROMPT_IDS)
    for chunk in (_prompt_chunk(), _token_chunk(0, usage=True)):
        echo_only.add(chunk)
    full = echo_only.full()
    (choice,) = full["choices"]
    assert choice["text"] == "".join(texts[:3]) and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == texts[:3] and choice["stop_reason"] is None
    assert full["usage"]["completion_tokens"] == 0 and full["usage"]["total_tokens"] == 5


def texts_of(tokenizer: RouterTokenizer, token_id: int) -> str:
    return tokenizer.token_texts([token_id])[0]


def test_chat_renderer_puts_prompt_logprobs_at_the_top_level(smollm2_tokenizer: object) -> None:
    chat = ChatRenderer("chatcmpl-1", "m", logprobs=False, include_usage=False,
                        tokenizer=RouterTokenizer(smollm2_tokenizer), prompt_logprobs=0)
    chat.prompt_token_ids(0, PROMPT_IDS)
    for chunk in (_prompt_chunk(), _token_chunk(0, usage=True)):
        chat.add(chunk)
    full = chat.full()
    assert [list(p) if p else p for p in full["prompt_logprobs"]] == [None, ["3458"], ["282"]]
    assert full["prompt_logprobs"][1]["3458"]["rank"] == 3 and "prompt_logprobs" not in full["choices"][0]


_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
_TOOL_MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]
# A Hermes-style template (as Qwen 2.5's): tools in a system turn, calls as <tool_call> JSON.
_HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{% for call in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_and_tool_messages_reach_the_chat_template(smollm2_tokenizer: object) -> None:
    """The tools and the earlier calls (their arguments as objects, as vLLM gives templates)
    rendered by a Hermes-style template, as the router tokenizes every chat."""
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = _HERMES_TEMPLATE  # type: ignore[attr-defined]
    body = {"model": "m", "messages": _TOOL_MESSAGES, "tools": [_WEATHER], "tool_choice": "auto"}
    routed = validate(ChatCompletionRequest, body).to_router_request("c1", tool_parser="hermes")
    assert isinstance(routed.prompt, ChatPrompt) and routed.prompt.tools == (_WEATHER,)
    text = RouterTokenizer(tok).decode(RouterTokenizer(tok).encode(routed.prompt))
    assert json.dumps(_WEATHER) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    assert not routed.sampling.HasField("structured_output")  # auto: the model decides


def test_tool_choices_become_formats_and_bad_ones_are_refused() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [_WEATHER]}
    named = validate(ChatCompletionRequest, {**base, "tool_choice": {"type": "function", "function": {
        "name": "get_weather"}}}).to_router_request("c1")
    assert json.loads(named.sampling.structured_output.json) == _WEATHER["function"]["parameters"]
    one_call = {**base, "tool_choice": "required", "parallel_tool_calls": False}
    required = validate(ChatCompletionRequest, one_call)
    schema = json.loads(required.to_router_request("c2").sampling.structured_output.json)
    assert schema["type"] == "array" and schema["maxItems"] == 1
    none = validate(ChatCompletionRequest, {**base, "tool_choice": "none"}).to_router_request("c3")
    assert not none.sampling.HasField("structured_output")
    bad_tool = [{"type": "function", "function": {"name": "a b"}}]
    bad_call = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]
    for body, param in [
        (base, "tool_choice"),  # auto by default, and no parser for the model
        ({**base, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({**base, "tool_choice": "sometimes"}, "tool_choice"),
        ({**base, "tools": bad_tool, "tool_choice": "none"}, "tools"),
        ({**base, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({**base, "tools": None, "tool_choice": "required"}, "tool_choice"),
        ({**base, "tool_choice": "none", "messages": bad_call}, "messages"),
    ]:
        with pytest.raises(InvalidParam) as refused:
            validate(ChatCompletionRequest, body).to_router_request("c4")
        assert refused.value.param == param, body


def test_chat_template_kwargs_reach_the_template_and_reserved_names_are_refused(
        smollm2_tokenizer: object) -> None:
    """Qwen3's ``enable_thinking`` as vLLM passes it: a template variable; a name the renderer owns
    (``tokenize`` would make it return ids) is refused naming the parameter."""
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (  # type: ignore[attr-defined]
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
        "<think>\n\n</think>\n\n{% endif %}")
    router_tok = RouterTokenizer(tok)
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    plain = validate(ChatCompletionRequest, body).to_router_request("c1")
    off = validate(ChatCompletionRequest, {**body, "chat_template_kwargs": {"enable_thinking": False}})
    thinking_off = off.to_router_request("c2")
    assert isinstance(thinking_off.prompt, ChatPrompt)
    assert router_tok.decode(router_tok.encode(thinking_off.prompt)).endswith("<think>\n\n</think>\n\n")
    assert not router_tok.decode(router_tok.encode(plain.prompt)).endswith("</think>\n\n")  # type: ignore[arg-type]
    for reserved in ({"tokenize": True}, {"messages": []}, {"eos_token": "x"}, {"not a name": 1}):
        refused = validate(ChatCompletionRequest, {**body, "chat_template_kwargs": reserved})
        chat = refused.to_router_request("c3")
        with pytest.raises(InvalidRequest, match="^chat_template_kwargs: "):
            router_tok.encode(chat.prompt)  # type: ignore[arg-type]
