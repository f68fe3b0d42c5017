"""Hypothesis strategies for ``llmserve.v1.GenerateRequest`` (tests/chaos/test_fuzz.py): every
field, valid values and hostile ones (out of range, NaN and infinities, huge counts, empty or
enormous strings, unknown models, unused resume tokens), biased toward small outputs so that
thousands of requests run in CI time."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from llmserve.v1 import generation_pb2 as pb

UINT32 = 2**32 - 1
INT32 = 2**31 - 1
floats = st.one_of(
    st.floats(min_value=-3.0, max_value=3.0, allow_nan=False),
    st.sampled_from([0.0, 1.0, -0.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf")]),
    st.floats(width=32),
)
small_or_any_uint = st.one_of(st.integers(0, 8), st.integers(0, UINT32))
token_id = st.one_of(st.integers(0, 49151), st.integers(-INT32 - 1, INT32))
text = st.text(max_size=40)


@st.composite
def hostile_sampling(draw: Any) -> pb.SamplingParams:
    """Any value of every field: mostly refused, some by chance within range."""
    s = pb.SamplingParams()
    optional: dict[str, Any] = {
        "max_tokens": st.one_of(st.integers(0, 8), st.integers(0, UINT32), st.integers(500, 520)),
        "min_tokens": small_or_any_uint,
        "temperature": floats,
        "top_p": floats,
        "top_k": st.one_of(st.integers(-2, 60), st.sampled_from([49151, 49152, 49153]),
                           st.integers(-INT32 - 1, INT32)),
        "min_p": floats,
        "seed": st.integers(0, 2**64 - 1),
        "presence_penalty": floats,
        "frequency_penalty": floats,
        "repetition_penalty": floats,
        "include_stop_str_in_output": st.booleans(),
        "ignore_eos": st.booleans(),
        "logprobs": st.one_of(st.integers(0, 21), st.integers(0, UINT32)),
        "n": st.one_of(st.integers(0, 4), st.integers(0, UINT32)),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            setattr(s, name, draw(values))
    s.stop.extend(draw(st.lists(st.one_of(text, st.just("")), max_size=3)))
    s.stop_token_ids.extend(draw(st.lists(token_id, max_size=4)))
    for k, v in draw(st.dictionaries(token_id, floats, max_size=4)).items():
        s.logit_bias[k] = v
    return s


@st.composite
def valid_sampling(draw: Any) -> pb.SamplingParams:
    """Every field within its documented range (short outputs): these must all be served."""
    vocab_id = st.integers(0, 49151)
    s = pb.SamplingParams(max_tokens=draw(st.integers(1, 8)))
    optional: dict[str, Any] = {
        "min_tokens": st.integers(0, 1),
        "temperature": st.floats(0.0, 2.0),
        "top_p": st.floats(0.01, 1.0),
        "top_k": st.integers(-1, 49152),
        "min_p": st.floats(0.0, 1.0),
        "seed": st.integers(0, 2**64 - 1),
        "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0),
        "repetition_penalty": st.floats(0.01, 2.0),
        "include_stop_str_in_output": st.booleans(),
        "ignore_eos": st.booleans(),
        "logprobs": st.integers(0, 20),
        "n": st.integers(1, 4),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            setattr(s, name, draw(values))
    s.stop.extend(draw(st.lists(st.text(min_size=1, max_size=5), max_size=2)))
    s.stop_token_ids.extend(draw(st.lists(vocab_id, max_size=3)))
    for k, v in draw(st.dictionaries(vocab_id, st.floats(-100.0, 100.0), max_size=3)).items():
        s.logit_bias[k] = v
    return s


@st.composite
def generate_requests(draw: Any, model: str) -> tuple[pb.GenerateRequest, bool]:
    """(request, valid): half valid requests for ``model`` (each must be served), half hostile
    ones (any model name, input and field values, oversized ids, unrequested resume tokens)."""
    if draw(st.booleans()):
        return draw(_valid_request(model)), True
    return draw(_hostile_request(model)), False


@st.composite
def _valid_request(draw: Any, model: str) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=draw(st.sampled_from([model, ""])), sampling=draw(valid_sampling()))
    kind = draw(st.sampled_from(["prompt", "prompt_token_ids", "messages"]))
    if kind == "prompt":
        printable = st.characters(categories=("L", "N", "P", "S"))  # text that tokenizes to something
        request.prompt = draw(st.text(printable, min_size=1, max_size=200))
    elif kind == "prompt_token_ids":
        request.prompt_token_ids.ids.extend(draw(st.lists(st.integers(0, 49151), min_size=1, max_size=60)))
    else:
        turns = st.tuples(st.sampled_from(["user", "assistant", "system"]), st.text(max_size=80))
        for role, content in draw(st.lists(turns, min_size=1, max_size=4)):
            request.messages.messages.add(role=role, content=content)
    request.request_id = draw(st.text(max_size=32))
    return request


@st.composite
def _hostile_request(draw: Any, model: str) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=draw(st.sampled_from([model, model, "", "no-such-model"])))
    kind = draw(st.sampled_from(["prompt", "prompt_token_ids", "messages", "none"]))
    if kind == "prompt":
        request.prompt = draw(st.one_of(text, st.just("x" * 5000), st.just("")))
    elif kind == "prompt_token_ids":
        ids = draw(st.one_of(st.lists(token_id, max_size=40), st.just([7] * 600)))
        request.prompt_token_ids.SetInParent()
        request.prompt_token_ids.ids.extend(ids)
    elif kind == "messages":
        request.messages.SetInParent()
        roles = st.one_of(st.sampled_from(["user", "assistant", "system"]), text)
        for role, content in draw(st.lists(st.tuples(roles, text), max_size=6)):
            request.messages.messages.add(role=role, content=content)
        if draw(st.booleans()):
            request.messages.add_generation_prompt = draw(st.booleans())
    if draw(st.booleans()):
        request.sampling.CopyFrom(draw(hostile_sampling()))
    request.request_id = draw(st.one_of(st.just(""), text, st.just("r" * 300)))
    if draw(st.integers(0, 4)) == 0:
        request.resume.output_token_ids.extend(draw(st.lists(token_id, min_size=1, max_size=10)))
    if draw(st.integers(0, 4)) == 0:
        request.priority = draw(st.integers(-INT32 - 1, INT32))
    return request
