"""The official ``openai`` SDK (sync and async) against the router's OpenAI door of a real
``llmserve up`` stack: completions and chat, streamed and whole, n=2, stop strings, logprobs,
cached-token usage, vLLM's extras (prompt logprobs and echo without generation included); greedy
text equals the same request through ``llmserve.v1.Generation``."""

from __future__ import annotations

import json

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from llmserve.client import AsyncClient, Client
from tests.router.frontends.stack_proc import MODEL, StackProc, http_json

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(stack: StackProc) -> OpenAI:
    return OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)


def _native(stack: StackProc, **kwargs: object) -> str:
    with Client(stack.grpc_target) as native:
        return native.complete(MODEL, **kwargs).text  # type: ignore[arg-type]


def test_models(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_greedy_matches_native(client: OpenAI, stack: StackProc) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    native = _native(stack, prompt=PROMPT, max_tokens=12, temperature=0.0)
    assert reply.object == "text_completion" and reply.model == MODEL and reply.id.startswith("cmpl-")
    assert [c.text for c in reply.choices] == [native]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_chat_greedy_matches_native(client: OpenAI, stack: StackProc) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10,  # type: ignore[arg-type]
                                           temperature=0)
    native = _native(stack, messages=MESSAGES, max_tokens=10, temperature=0.0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    message = reply.choices[0].message
    assert message.role == "assistant" and message.content == native


def test_streamed_completion_equals_whole(client: OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_option_has_no_usage_chunk(client: OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                            stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


async def test_async_chat_streamed_equals_whole_and_native(stack: StackProc) -> None:
    client = AsyncOpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)
    whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,  # type: ignore[arg-type]
                                                 temperature=0)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,  # type: ignore[arg-type]
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    async with AsyncClient(stack.grpc_target) as native:
        expected = await native.complete(MODEL, messages=MESSAGES, max_tokens=8, temperature=0.0)
    assert whole.choices[0].message.content == expected.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    await client.close()


async def test_async_completion_matches_native(stack: StackProc) -> None:
    client = AsyncOpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)
    reply = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    async with AsyncClient(stack.grpc_target) as native:
        expected = await native.complete(MODEL, prompt=PROMPT, max_tokens=6, temperature=0.0)
    assert reply.choices[0].text == expected.text
    await client.close()


def test_n2_whole_and_streamed(client: OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, n=2,  # type: ignore[arg-type]
                                           temperature=1.0, seed=11)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage is not None and reply.usage.completion_tokens == 10
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, temperature=1.0,
                                            seed=11, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, temperature=1.0, seed=11)
    assert texts == {c.index: c.text for c in whole.choices}  # seeded: the same samples


def test_stop_string_cuts_the_text(client: OpenAI, stack: StackProc) -> None:
    full = _native(stack, prompt=PROMPT, max_tokens=16, temperature=0.0)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_chat_logprobs(client: OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode())
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)


def test_completion_logprobs_whole_and_streamed(client: OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and len(logprobs.tokens) == 5
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    assert logprobs.top_logprobs is not None
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True):
        assert token in top and 1 <= len(top) <= 3
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                              logprobs=2, stream=True))
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens or [])]  # type: ignore[union-attr]
    assert tokens == logprobs.tokens


def test_repeated_prompt_reports_cached_tokens(client: OpenAI) -> None:
    prompt = "Caching test. " + " ".join(f"word{i}" for i in range(60))
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens == second.usage.prompt_tokens >= 48
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 32  # whole 16-token blocks


def test_echo_and_vllm_extras(client: OpenAI, stack: StackProc) -> None:
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    # top_k=1 samples the argmax: the greedy text, at any temperature
    top1 = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0,
                                     extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0})
    assert top1.choices[0].text == plain.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True, "min_tokens": 3, "stop_token_ids": [7]})
    assert ids.usage is not None and ids.usage.prompt_tokens == 4


def test_stop_reason_is_the_stop_token_id_or_the_stop_string(client: OpenAI, stack: StackProc) -> None:
    """vLLM's ``stop_reason``: the stop token id as a JSON number, a stop string as a string, in
    whole and streamed replies and through the native client."""
    with Client(stack.grpc_target) as native:
        greedy = native.complete(MODEL, prompt=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True)
        token = greedy.token_ids[3]
        by_id = native.complete(MODEL, prompt=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True,
                                stop_token_ids=[token])
    assert by_id.token_ids == greedy.token_ids[: greedy.token_ids.index(token) + 1]
    assert by_id.sequences[0].stop_reason == token  # an int, not its text
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    extra = {"ignore_eos": True, "stop_token_ids": [token]}
    whole = client.completions.create(**args, extra_body=extra)  # type: ignore[call-overload]
    assert whole.choices[0].finish_reason == "stop"
    assert (whole.choices[0].model_extra or {})["stop_reason"] == token
    stream = client.completions.create(**args, extra_body=extra, stream=True)  # type: ignore[call-overload]
    ends = [(c.choices[0].model_extra or {}).get("stop_reason")
            for c in stream if c.choices and c.choices[0].finish_reason]
    assert ends == [token]
    stop = greedy.text[-3:]
    by_text = client.completions.create(**args, stop=[stop], extra_body={"ignore_eos": True})  # type: ignore[call-overload]
    assert (by_text.choices[0].model_extra or {})["stop_reason"] == stop


def test_a_batch_of_prompts_is_served_as_one_request_each(client: OpenAI) -> None:
    """A list of prompts (vLLM's batch): choice ``i * n + j`` is prompt ``i``'s sample ``j`` with
    the text the prompt alone gets, echo per prompt, usage summed, one usage chunk when streamed."""
    prompts = [PROMPT, "Hello there", "Count: one, two"]
    args = {"model": MODEL, "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = [client.completions.create(prompt=p, **args) for p in prompts]  # type: ignore[call-overload]
    batch = client.completions.create(prompt=prompts, n=2, echo=True, **args)  # type: ignore[call-overload]
    assert [c.index for c in batch.choices] == list(range(6))
    expected = [p + a.choices[0].text for p, a in zip(prompts, alone, strict=True) for _ in range(2)]
    assert [c.text for c in batch.choices] == expected
    assert batch.usage is not None and batch.usage.completion_tokens == 30
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage is not None)
    texts = dict.fromkeys(range(6), "")
    usages = []
    for chunk in client.completions.create(prompt=prompts, n=2, echo=True, stream=True,  # type: ignore[call-overload]
                                           stream_options={"include_usage": True}, **args):
        usages += [chunk.usage] if chunk.usage is not None else []
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {c.index: c.text for c in batch.choices}
    assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(batch.usage.prompt_tokens, 30)]
    ids = client.completions.create(prompt=[[1, 2, 3], [4, 5, 6, 7]], **args)  # type: ignore[call-overload]
    assert len(ids.choices) == 2 and ids.usage is not None and ids.usage.prompt_tokens == 7


def test_continue_final_message_prefills_the_answer(client: OpenAI, stack: StackProc) -> None:
    """vLLM's ``continue_final_message``: the last (assistant) message is continued, not answered;
    the text is what the same ids get as a plain completion, through both doors and /tokenize."""
    prefill = [*MESSAGES, {"role": "assistant", "content": "My favourite color is"}]
    extra = {"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True}
    chat = client.chat.completions.create(model=MODEL, messages=prefill, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                          extra_body=extra)
    body = {"model": MODEL, "messages": prefill, **extra}
    ids = http_json("POST", f"{stack.http_url}/tokenize", body)[1]["tokens"]
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage is not None and chat.usage.prompt_tokens == len(ids)
    with Client(stack.grpc_target) as native:
        got = native.complete(MODEL, messages=prefill, add_generation_prompt=False,
                              continue_final_message=True, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert got.text == plain.choices[0].text


def test_truncate_prompt_tokens_serves_the_prompts_end(client: OpenAI) -> None:
    """vLLM's ``truncate_prompt_tokens``: a prompt over the context (512) is served as its last
    N tokens, the same text as sending those alone; -1 keeps what the context holds."""
    ids = [(7 * i) % 900 + 10 for i in range(600)]
    args = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    cut = client.completions.create(prompt=ids, extra_body={"truncate_prompt_tokens": 100}, **args)  # type: ignore[call-overload]
    alone = client.completions.create(prompt=ids[-100:], **args)  # type: ignore[call-overload]
    assert cut.usage is not None and cut.usage.prompt_tokens == 100
    assert cut.choices[0].text == alone.choices[0].text
    full = client.completions.create(prompt=ids, extra_body={"truncate_prompt_tokens": -1},  # type: ignore[call-overload]
                                     **{**args, "max_tokens": 1})
    assert full.usage is not None and full.usage.prompt_tokens == 511
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(prompt=ids, extra_body={"truncate_prompt_tokens": 512}, **args)  # type: ignore[call-overload]
    assert refused.value.param == "truncate_prompt_tokens"  # type: ignore[attr-defined]


def test_chat_max_completion_tokens_and_context_default(client: OpenAI) -> None:
    capped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,  # type: ignore[arg-type]
                                            temperature=0, extra_body={"ignore_eos": True})
    assert capped.usage is not None and capped.usage.completion_tokens == 3
    # No max_tokens in chat: until the context (512 tokens for the tiny model) is full.
    open_ended = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
                                                extra_body={"ignore_eos": True})
    usage = open_ended.usage
    assert usage is not None and open_ended.choices[0].finish_reason == "length"
    assert usage.prompt_tokens + usage.completion_tokens == 512


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(client: OpenAI, stack: StackProc) -> None:
    """lm-eval's ``local-completions`` loglikelihood request (prompt ids, ``max_tokens`` 1,
    ``logprobs`` 1, ``echo``): the prompt's tokens lead the logprobs, the first null; where the
    prompt continues with the model's own greedy tokens, their logprobs are those the tokens got
    when generated; the native client's ``prompt_logprobs`` (through the router) agree; streamed,
    the first chunk has the same."""
    ids = http_json("POST", f"{stack.http_url}/tokenize", {"model": MODEL, "prompt": PROMPT})[1]["tokens"]
    with Client(stack.grpc_target) as native:
        made = native.complete(MODEL, prompt_token_ids=ids, max_tokens=3, temperature=0.0, logprobs=0,
                               ignore_eos=True)
        context = ids + made.token_ids
        scored_natively = native.complete(MODEL, prompt_token_ids=context, max_tokens=1, temperature=0.0,
                                          prompt_logprobs=1)
    args = {"model": MODEL, "prompt": context, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    reply = client.completions.create(**args)  # type: ignore[call-overload]
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.tokens is not None and len(logprobs.tokens) == len(context) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    scored = logprobs.token_logprobs[len(ids):len(context)]
    assert scored == pytest.approx([lp.logprob for lp in made.sequences[0].logprobs], abs=1e-4)
    assert [lp.token_id for lp in scored_natively.prompt_logprobs] == context[1:]
    assert logprobs.token_logprobs[1:len(context)] == pytest.approx(
        [lp.logprob for lp in scored_natively.prompt_logprobs], abs=1e-6)
    for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:],
                                 strict=True):
        assert top is not None and top[token] == pytest.approx(value) and len(top) <= 2
        assert max(top.values()) >= value - 1e-6
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(context) + 1)]
    streamed = list(client.completions.create(stream=True, **args))  # type: ignore[call-overload]
    first = streamed[0].choices[0].logprobs
    assert first is not None and first.tokens == logprobs.tokens
    assert first.token_logprobs is not None and first.token_logprobs[0] is None
    assert first.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-6)


def test_echo_without_generation_and_vllm_prompt_logprobs(client: OpenAI, stack: StackProc) -> None:
    """vLLM's echo with ``max_tokens`` 0: each prompt of a batch alone, with its logprobs, finish
    "length", no completion tokens; vLLM's ``prompt_logprobs`` (its shape: null, then token id ->
    logprob, rank, decoded token) on each completions choice and at a chat response's top level."""
    prompts = [PROMPT, "Hello there"]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                      extra_body={"prompt_logprobs": 2})
    assert reply.usage is not None and reply.usage.completion_tokens == 0
    for prompt, choice in zip(prompts, reply.choices, strict=True):
        ids = http_json("POST", f"{stack.http_url}/tokenize", {"model": MODEL, "prompt": prompt})[1]["tokens"]
        assert choice.text == prompt and choice.finish_reason == "length"
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert len(choice.logprobs.token_logprobs) == len(ids)
        entries = (choice.model_extra or {})["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        values = choice.logprobs.token_logprobs
        for token_id, value, entry in zip(ids[1:], values[1:], entries[1:], strict=True):
            own = entry[str(token_id)]
            assert own["logprob"] == pytest.approx(value) and own["rank"] >= 1
            ranked = sorted(entry.values(), key=lambda e: e["rank"])  # the prompt token and the top 2
            assert len(entry) in (2, 3) and {e["rank"] for e in ranked} >= {1, 2}
            assert [e["logprob"] for e in ranked] == sorted((e["logprob"] for e in ranked), reverse=True)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0,  # type: ignore[arg-type]
                                          extra_body={"prompt_logprobs": 0})
    entries = (chat.model_extra or {})["prompt_logprobs"]
    assert chat.usage is not None and len(entries) == chat.usage.prompt_tokens and entries[0] is None
    assert all(len(entry) == 1 for entry in entries[1:])


def test_allowed_token_ids_and_bad_words(client: OpenAI, stack: StackProc, smollm2_tokenizer: object) -> None:
    """vLLM's extras: only the allowed tokens are generated; a bad word's token is never
    generated where the plain reply had it; both through the native API alike."""
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    letters = [smollm2_tokenizer.convert_tokens_to_ids(c) for c in "abc"]  # type: ignore[attr-defined]
    allowed = client.completions.create(**args, extra_body={"allowed_token_ids": letters, "ignore_eos": True})  # type: ignore[call-overload]
    text = allowed.choices[0].text
    assert len(text) == 6 and set(text) <= set("abc")
    plain = client.completions.create(**args, extra_body={"ignore_eos": True})  # type: ignore[call-overload]
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.tokens is not None
    tokens = plain.choices[0].logprobs.tokens
    position, word = next((i, t) for i, t in enumerate(tokens) if t.strip().isalpha())
    banned = client.completions.create(**args, extra_body={"bad_words": [word], "ignore_eos": True})  # type: ignore[call-overload]
    assert banned.choices[0].logprobs is not None and banned.choices[0].logprobs.tokens is not None
    assert banned.choices[0].logprobs.tokens[:position] == plain.choices[0].logprobs.tokens[:position]
    assert banned.choices[0].logprobs.tokens[position] != word
    native = _native(stack, prompt=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True, bad_words=[word])
    assert banned.choices[0].text == native
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**args, extra_body={"allowed_token_ids": []})  # type: ignore[call-overload]
    assert refused.value.param == "allowed_token_ids"  # type: ignore[attr-defined]


def _function(name: str, argument: str, values: list[str]) -> dict[str, object]:
    """A tool taking one string argument out of ``values``."""
    parameters = {"type": "object", "properties": {argument: {"type": "string", "enum": values}},
                  "required": [argument], "additionalProperties": False}
    return {"type": "function",
            "function": {"name": name, "description": f"{name} of a place", "parameters": parameters}}


WEATHER_TOOL = _function("get_weather", "city", ["Paris", "Rome"])
TIME_TOOL = _function("get_time", "zone", ["UTC", "CET"])
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "user", "content": "And Rome?"},
]


def _streamed_calls(stream: object) -> tuple[list[dict[str, str]], str | None]:
    """The tool calls a streamed chat reply sent (deltas merged by index) and its finish reason."""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:  # type: ignore[attr-defined]
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = (delta.function.name if delta.function else None) or call["name"]
            call["arguments"] += (delta.function.arguments if delta.function else None) or ""
    return [calls[i] for i in sorted(calls)], finish


def test_a_named_tool_choice_calls_it_whole_and_streamed(client: OpenAI) -> None:
    """The earlier call and its result go through the template; the reply is a call of the named
    function with arguments its schema allows (structured output), finish "stop" as vLLM's."""
    args = {"model": MODEL, "messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL, TIME_TOOL],
            "temperature": 0, "max_tokens": 60,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    message = whole.choices[0].message
    assert message.content is None and message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    assert whole.choices[0].finish_reason == "stop"
    calls, finish = _streamed_calls(client.chat.completions.create(**args, stream=True))  # type: ignore[call-overload]
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]
    assert calls[0]["id"] and finish == "stop"


def test_required_tool_choice_calls_some_tool(client: OpenAI) -> None:
    args = {"model": MODEL, "messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL, TIME_TOOL],
            "temperature": 0, "max_tokens": 80, "tool_choice": "required", "parallel_tool_calls": False}
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    message = whole.choices[0].message
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    function = message.tool_calls[0].function
    name, arguments = function.name, json.loads(function.arguments)
    assert (name, sorted(arguments)) in [("get_weather", ["city"]), ("get_time", ["zone"])]
    assert whole.choices[0].finish_reason == "tool_calls"
    calls, finish = _streamed_calls(client.chat.completions.create(**args, stream=True))  # type: ignore[call-overload]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(name, arguments)]
    assert finish == "tool_calls"


def test_auto_tool_choice_reads_hermes_calls_from_the_text(client: OpenAI) -> None:
    """The stack's parser is hermes: a reply written as a <tool_call> (forced here by a regex, as a
    random model writes none) is a call, finish "tool_calls"; without one the text is content."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    regex = call.replace("{", "\\{").replace("}", "\\}")
    args = {"model": MODEL, "messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL], "temperature": 0,
            "max_tokens": 60}
    forced = {"structured_outputs": {"regex": regex}}
    whole = client.chat.completions.create(**args, extra_body=forced)  # type: ignore[call-overload]
    message = whole.choices[0].message
    assert message.content is None and message.tool_calls is not None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Rome"})]
    assert whole.choices[0].finish_reason == "tool_calls"
    stream = client.chat.completions.create(**args, stream=True, extra_body=forced)  # type: ignore[call-overload]
    calls, finish = _streamed_calls(stream)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert finish == "tool_calls"
    words = {"structured_outputs": {"regex": "[a-z ]{5,20}"}}
    plain = client.chat.completions.create(**args, extra_body=words)  # type: ignore[call-overload]
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_reasoning_is_apart_from_the_answer_whole_and_streamed(client: OpenAI) -> None:
    """The stack's reasoning parser is qwen3: a reply with a <think> part (forced by a regex: a
    random model writes none) has it as reasoning_content; a reply without one has none."""
    args = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 40,
            "extra_body": {"structured_outputs": {"regex": "<think>[a-z]{3,8}</think>[a-z]{3,8}"}}}
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    message = whole.choices[0].message.model_dump()
    reasoning, content = message["reasoning_content"], message["content"]
    assert reasoning.isalpha() and content.isalpha() and 3 <= len(reasoning) <= 8
    streamed_reasoning, streamed_content = "", ""
    for chunk in client.chat.completions.create(**args, stream=True):  # type: ignore[call-overload]
        delta = chunk.choices[0].delta.model_dump()
        streamed_reasoning += delta.get("reasoning_content") or ""
        streamed_content += delta.get("content") or ""
    assert (streamed_reasoning, streamed_content) == (reasoning, content)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=5)  # type: ignore[arg-type]
    assert plain.choices[0].message.model_dump()["reasoning_content"] is None


def test_continuous_usage_stats_count_each_choice_so_far(client: OpenAI) -> None:
    """vLLM's ``stream_options.continuous_usage_stats``: every chunk of a choice carries its
    prompt and its tokens so far; the last usage chunk is the whole request's."""
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=2,  # type: ignore[call-overload]
                                       stream=True, extra_body={"ignore_eos": True}, stream_options={
                                           "include_usage": True, "continuous_usage_stats": True})
    seen: dict[int, list[int]] = {}
    final = None
    for chunk in stream:
        if not chunk.choices:
            final = chunk.usage
            continue
        usage = chunk.usage
        assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        seen.setdefault(chunk.choices[0].index, []).append(usage.completion_tokens)
    assert final is not None and final.completion_tokens == 12
    for counts in seen.values():
        assert counts == sorted(counts) and counts[-1] == 6
    assert usage.prompt_tokens == final.prompt_tokens
