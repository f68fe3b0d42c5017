"""OpenAI's Responses API through the official ``openai`` SDK against a real ``llmserve up`` stack
(tiny model, CPU): every response equals the chat completion of the same conversation (greedy),
whole and streamed (the SDK's stream helper checks the event order), chained with
``previous_response_id``, retrieved and deleted, with function tools, reasoning, structured
output, logprobs, background runs and cancellation, and the refusals naming their parameter."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.router.frontends.stack_proc import MODEL, StackProc, http_json

WORDS = {"structured_outputs": {"regex": "[a-z]{3,8}"}}  # a reply that ends (EOS) before its limit
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "weather of a city",
    "parameters": PARAMETERS,
}
CHAT_WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "weather of a city", "parameters": PARAMETERS},
}


@pytest.fixture(scope="module")
def client(stack: StackProc) -> OpenAI:
    return OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)


def _chat(client: OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,  # type: ignore[call-overload]
        **kwargs,
    )


def test_a_response_is_the_chat_reply_of_its_conversation(client: OpenAI) -> None:
    """``instructions`` is the system message, ``input`` the user's; a reply cut by
    ``max_output_tokens`` is incomplete, its usage chat's."""
    response = client.responses.create(
        model=MODEL, instructions="You are terse.", input="Name a color.", max_output_tokens=8, temperature=0
    )
    chat = _chat(
        client,
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
        max_tokens=8,
    )
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.output_text == chat.choices[0].message.content
    assert [item.type for item in response.output] == ["message"]
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert response.usage is not None and chat.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert response.instructions == "You are terse." and response.max_output_tokens == 8 and response.store


def test_the_streamed_response_equals_the_whole_one(client: OpenAI) -> None:
    """The SDK's stream helper accepts the events (it checks their order and identities); their
    deltas add up to the whole response's text; sequence numbers count from 0."""
    args: dict[str, Any] = {
        "model": MODEL,
        "input": "Name a fruit.",
        "max_output_tokens": 12,
        "temperature": 0,
        "extra_body": WORDS,
    }
    whole = client.responses.create(**args)
    assert whole.status == "completed" and whole.output_text.isalpha()
    with client.responses.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas == whole.output_text == final.output_text
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_raw_stream_of_an_incomplete_response_ends_with_response_incomplete(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL,
            input="Count.",
            max_output_tokens=4,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == "incomplete" and final.usage is not None and final.usage.output_tokens == 4


def test_previous_response_id_continues_the_conversation_from_any_state(client: OpenAI) -> None:
    """The second turn is the chat of the first turn's input and answer plus the new input (the
    first's instructions are not carried, as OpenAI's); the response is stored and retrievable."""
    first = client.responses.create(
        model=MODEL, instructions="Be brief.", input="Name a color.", max_output_tokens=6, temperature=0
    )
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input="Another one.", max_output_tokens=6, temperature=0
    )
    chat = _chat(
        client,
        [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Another one."},
        ],
        max_tokens=6,
    )
    assert second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    deleted = client.responses.delete(first.id)
    assert deleted is None  # the SDK returns nothing; the door answered {"deleted": true}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=MODEL, previous_response_id=first.id, input="More.")
    assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_store_false_keeps_nothing(client: OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=2, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_function_calls_and_their_outputs_go_through_the_template(client: OpenAI) -> None:
    """A named function is called (structured output); its output, sent back with the call's id,
    makes the next turn the chat of the same tool conversation."""
    args: dict[str, Any] = {
        "model": MODEL,
        "input": "Weather in Paris?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 40,
        "temperature": 0,
    }
    called = client.responses.create(**args)
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    arguments = json.loads(call.arguments)
    assert arguments["city"] in ("Paris", "Rome") and called.status == "completed"
    with client.responses.stream(**args) as stream:
        events = list(stream)
        streamed = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")  # type: ignore[union-attr]
    assert deltas == call.arguments == streamed.output[0].arguments  # type: ignore[union-attr]
    answered = client.responses.create(
        model=MODEL,
        previous_response_id=called.id,
        tools=[WEATHER],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        max_output_tokens=6,
        temperature=0,
        tool_choice="none",
    )
    chat = _chat(
        client,
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
        ],
        tools=[CHAT_WEATHER],
        tool_choice="none",
        max_tokens=6,
    )
    assert answered.output_text == chat.choices[0].message.content


def test_auto_tool_choice_reads_the_models_calls(client: OpenAI) -> None:
    """The stack's hermes parser reads a call the model wrote (forced by a regex)."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    regex = text.replace("{", "\\{").replace("}", "\\}")
    response = client.responses.create(
        model=MODEL,
        input="Weather in Rome?",
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=60,
        temperature=0,
        extra_body={"structured_outputs": {"regex": regex}},
    )
    assert [(item.type, getattr(item, "name", None)) for item in response.output] == [
        ("function_call", "get_weather")
    ]
    assert json.loads(response.output[0].arguments) == {"city": "Rome"}  # type: ignore[union-attr]


def test_reasoning_is_an_output_item_of_its_own(client: OpenAI) -> None:
    """The stack's qwen3 parser: the <think> part is a reasoning item, the rest the message,
    streamed as reasoning_text deltas and output_text deltas."""
    args: dict[str, Any] = {
        "model": MODEL,
        "input": "Think.",
        "max_output_tokens": 40,
        "temperature": 0,
        "extra_body": {"structured_outputs": {"regex": "<think>[a-z]{3,8}</think>[a-z]{3,8}"}},
    }
    whole = client.responses.create(**args)
    reasoning, message = whole.output
    assert reasoning.type == "reasoning" and message.type == "message"
    thought = reasoning.content[0].text  # type: ignore[index]
    assert thought.isalpha() and whole.output_text.isalpha()
    with client.responses.stream(**args) as stream:
        events = list(stream)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought  # type: ignore[union-attr]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text  # type: ignore[union-attr]
    assert whole.usage is not None and whole.usage.output_tokens_details.reasoning_tokens > 0


def test_text_format_and_logprobs(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL,
        input="A color as JSON.",
        max_output_tokens=30,
        temperature=0,
        top_logprobs=2,
        include=["message.output_text.logprobs"],
        text={"format": {"type": "json_schema", "name": "color", "schema": schema}},
    )
    assert json.loads(response.output_text)["color"] in ("red", "blue")
    content = response.output[0].content[0]  # type: ignore[union-attr]
    chat = _chat(
        client,
        [{"role": "user", "content": "A color as JSON."}],
        max_tokens=30,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "color", "schema": schema}},
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None and len(content.logprobs) == response.usage.output_tokens  # type: ignore[union-attr]
    ours, chats = content.logprobs, chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [(lp.token, [t.token for t in lp.top_logprobs]) for lp in ours] == [
        (lp.token, [t.token for t in lp.top_logprobs]) for lp in chats
    ]
    # the same model on the same tokens; the prefix cache may change the last float bits
    assert [lp.logprob for lp in ours] == pytest.approx([lp.logprob for lp in chats], abs=1e-4)


def _until_done(client: OpenAI, response_id: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        assert time.monotonic() < deadline, f"{response_id} still {response.status}"
        time.sleep(0.05)


def test_a_background_response_is_polled_and_equals_the_foreground_one(client: OpenAI) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "input": "Name a color.",
        "max_output_tokens": 8,
        "temperature": 0,
    }
    queued = client.responses.create(**args, background=True)
    assert queued.status == "queued" and queued.background and not queued.output
    done = _until_done(client, queued.id)
    assert done.status == "incomplete" and done.output_text == client.responses.create(**args).output_text
    assert client.responses.cancel(queued.id).status == "incomplete"  # an ended response stays as it ended


def test_a_background_response_is_cancelled(client: OpenAI) -> None:
    queued = client.responses.create(
        model=MODEL,
        input="Count to a thousand.",
        max_output_tokens=400,
        background=True,
        extra_body={"ignore_eos": True},
    )
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled", cancelled.error
    assert client.responses.retrieve(queued.id).status == "cancelled"
    assert _until_done(client, queued.id).status == "cancelled"  # the run stored nothing after it


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
            400,
            "input[0].content[0]",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0].type"),
        ({"input": "x", "background": True, "stream": True}, 400, "background"),
        ({"input": "x", "background": True, "store": False}, 400, "background"),
        ({"input": "x", "truncation": "auto"}, 400, "truncation"),
        ({"input": "x", "include": ["file_search_call.results"]}, 400, "include"),
        ({"input": "x", "previous_response_id": "resp_" + "0" * 32}, 404, "previous_response_id"),
        ({"input": "x", "previous_response_id": "../../etc"}, 404, "previous_response_id"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "schema": "no"}}},
            400,
            "text.format.schema",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
            400,
            "input[0].arguments",
        ),
        ({"input": ""}, 400, "input"),
        ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ],
)
def test_refusals_name_their_parameter(
    stack: StackProc, body: dict[str, Any], status: int, param: str
) -> None:
    got, reply = http_json("POST", f"{stack.openai_url}/responses", {"model": MODEL, **body})
    assert (got, reply["error"]["param"]) == (status, param), reply


def test_unknown_ids_are_not_found(stack: StackProc) -> None:
    for method, path in (
        ("GET", "resp_" + "1" * 32),
        ("DELETE", "resp_" + "1" * 32),
        ("POST", "resp_" + "1" * 32 + "/cancel"),
        ("GET", "not-an-id"),
    ):
        got, reply = http_json(method, f"{stack.openai_url}/responses/{path}")
        assert got == 404 and reply["error"]["code"] == "response_not_found", (method, path, reply)
