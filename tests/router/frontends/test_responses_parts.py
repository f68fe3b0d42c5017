"""The Responses API's parts alone: input items as chat messages, the output items and their
stream events built from chat deltas, and the checks of a stored response read back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmserve.fleet import MemoryStateStore
from llmserve.security.records import FleetSecret
from router.frontends.openai_errors import InvalidParam
from router.frontends.responses_config import ResponsesStoreConfig
from router.frontends.responses_output import ResponseOutput
from router.frontends.responses_schema import ResponsesRequest, items_as_messages
from router.frontends.responses_store import (
    ResponseStore,
    StoredResponse,
    StoredResponseRejected,
    decode,
    encode,
)

SECRET = FleetSecret([b"0123456789abcdef0123"])
RESPONSE_ID = "resp_" + "a" * 32


def test_items_become_chat_messages() -> None:
    """developer is system; calls join the assistant message before them; reasoning is dropped."""
    items = [
        {"role": "developer", "content": "Be brief."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
        },
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me look."}],
        },
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
    ]
    calls = [
        {"id": c, "type": "function", "function": {"name": n, "arguments": a}}
        for c, n, a in (("c1", "f", "{}"), ("c2", "g", '{"x": 1}'))
    ]
    assert items_as_messages(items, "input") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
    ]


def test_the_chat_request_of_a_response() -> None:
    request = ResponsesRequest.model_validate(
        {
            "model": "m",
            "input": "hi",
            "instructions": "Be brief.",
            "max_output_tokens": 7,
            "top_logprobs": 3,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_object"}},
        }
    )
    raw = {"top_k": 5, "seed": 3}
    body = request.chat_body([{"role": "user", "content": "before"}], raw)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "before"},
        {"role": "user", "content": "hi"},
    ]
    assert (body["max_completion_tokens"], body["logprobs"], body["top_logprobs"]) == (7, True, 3)
    assert body["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["chat_template_kwargs"] == {"reasoning_effort": "low"}
    assert body["response_format"] == {"type": "json_object"} and (body["top_k"], body["seed"]) == (5, 3)
    chat = request.chat_request([], raw)
    assert chat.max_completion_tokens == 7 and chat.top_k == 5


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("response.") for e in events]


def test_output_items_and_their_events_follow_the_reply() -> None:
    out = ResponseOutput()
    events = out.feed({"role": "assistant", "reasoning_content": "hm"}, None, tokens=2)
    events += out.feed({"reasoning_content": "m", "content": "Hi"}, [{"token": "Hi"}], tokens=1)
    events += out.feed({}, [{"token": "<eos>"}], tokens=1)  # text-less: its logprob stays with the text
    events += out.feed(
        {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}]}, None
    )
    events += out.feed({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}, None)
    events += out.finish("completed")
    assert _types(events) == [
        "output_item.added",
        "content_part.added",
        "reasoning_text.delta",
        "reasoning_text.delta",
        "reasoning_text.done",
        "content_part.done",
        "output_item.done",
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.done",
        "content_part.done",
        "output_item.done",
        "output_item.added",
        "function_call_arguments.delta",
        "function_call_arguments.delta",
        "function_call_arguments.done",
        "output_item.done",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    reasoning, message, call = out.items
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "hmm"}]
    assert message["content"][0]["text"] == "Hi" and message["status"] == "completed"
    assert message["content"][0]["logprobs"] == [{"token": "Hi"}, {"token": "<eos>"}]
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == (
        "c1",
        "f",
        "{}",
        "completed",
    )
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1, 2]
    assert out.reasoning_tokens == 2  # the chunk that was reasoning alone


def test_a_message_cut_by_the_limit_is_incomplete() -> None:
    out = ResponseOutput()
    out.feed({"content": "Hel"}, None)
    out.finish("incomplete")
    assert out.items[0]["status"] == "incomplete"


def _stored(**changes: Any) -> StoredResponse:
    response = {"id": RESPONSE_ID, "object": "response", "status": "completed", "output": []}
    stored = StoredResponse(response, ({"role": "user", "content": "hi"},), "alice")
    return StoredResponse(**{**stored.__dict__, **changes})


def _fields(blob: bytes) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(blob)
    return fields


@pytest.mark.parametrize("secret", [None, SECRET])
def test_a_stored_response_reads_back(secret: FleetSecret | None) -> None:
    stored = _stored()
    assert decode(encode(stored, secret), RESPONSE_ID, secret, 1 << 20) == stored


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"x" * 2000, "over the limit"),
        (b'{"v": NaN}', "not a number"),
        (b"[]", "version"),
        (
            json.dumps(
                {
                    "v": 1,
                    "id": "resp_" + "b" * 32,
                    "owner": "a",
                    "response": {"id": "resp_" + "b" * 32},
                    "conversation": [],
                }
            ).encode(),
            "another id",
        ),
        (
            json.dumps(
                {
                    "v": 1,
                    "id": RESPONSE_ID,
                    "owner": "a",
                    "response": {"id": RESPONSE_ID, "object": "response", "status": "done", "output": []},
                    "conversation": [],
                }
            ).encode(),
            "not a response",
        ),
        (
            json.dumps(
                {
                    "v": 1,
                    "id": RESPONSE_ID,
                    "owner": "a",
                    "response": {
                        "id": RESPONSE_ID,
                        "object": "response",
                        "status": "completed",
                        "output": [],
                    },
                    "conversation": [{"role": ""}],
                }
            ).encode(),
            "malformed",
        ),
    ],
)
def test_documents_that_are_not_stored_responses_are_rejected(blob: bytes, why: str) -> None:
    with pytest.raises(StoredResponseRejected, match=why):
        decode(blob, RESPONSE_ID, None, 1000)


def test_a_signature_binds_every_field() -> None:
    fields = _fields(encode(_stored(), SECRET))
    fields["owner"] = "mallory"
    with pytest.raises(StoredResponseRejected, match="not signed"):
        decode(json.dumps(fields).encode(), RESPONSE_ID, SECRET, 1 << 20)
    with pytest.raises(StoredResponseRejected, match="not signed"):  # unsigned, to a router with a secret
        decode(encode(_stored(), None), RESPONSE_ID, SECRET, 1 << 20)


async def test_the_store_gives_a_response_to_its_owner_only() -> None:
    store = ResponseStore(MemoryStateStore(), ResponsesStoreConfig(max_record_bytes=1024))
    stored = _stored()
    blob = store.encode(stored)
    assert blob is not None
    await store.put(RESPONSE_ID, blob)
    assert await store.get(RESPONSE_ID, "alice") == stored
    assert await store.get(RESPONSE_ID, "bob") is None
    assert await store.get("../" + RESPONSE_ID, "alice") is None
    assert store.encode(_stored(conversation=({"role": "user", "content": "x" * 2000},))) is None  # too large
    off = ResponseStore(MemoryStateStore(), ResponsesStoreConfig(ttl_s=0))
    assert off.encode(stored) is None and await off.get(RESPONSE_ID, "alice") is None


def test_refusals_of_the_request_name_their_parameter() -> None:
    for body, param in (
        ({"input": "x", "prompt": {"id": "p"}}, "prompt"),
        ({"input": "x", "conversation": "c"}, "conversation"),
        ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ):
        with pytest.raises(InvalidParam) as refused:
            ResponsesRequest.model_validate(body).check()
        assert refused.value.param == param
