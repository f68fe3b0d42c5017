"""InputProcessor (validation, chat rendering, n > 1 fan-out) and OutputProcessor (aggregation, deltas)."""

from __future__ import annotations

from typing import Any

import pytest

from gpu_worker.core.types import EngineCoreOutput, FinishReason, TokenLogprobs
from gpu_worker.engine.output_processor import OutputKind, OutputProcessor
from gpu_worker.engine.processor import InputProcessor
from gpu_worker.sampling_params import SamplingParams
from llmserve.prompt_input import ChatPrompt

VOCAB = 49152


@pytest.fixture
def processor(smollm2_tokenizer: Any) -> InputProcessor:
    return InputProcessor(smollm2_tokenizer, VOCAB, max_model_len=64, eos_token_ids=frozenset({2}))


def test_text_tokens_and_chat(processor: InputProcessor, smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    req = processor.process("r1", "Hello world", SamplingParams(max_tokens=3))
    assert req.prompt == "Hello world"
    assert req.prompt_token_ids == tuple(tok.encode("Hello world"))
    (core,) = req.core_requests
    assert core.request_id == "r1" and core.eos_token_ids == frozenset({2})
    assert core.params.max_tokens == 3

    req = processor.process("r2", [1, 2, 3], None)
    assert req.prompt is None and req.prompt_token_ids == (1, 2, 3)

    messages = [{"role": "user", "content": "hi"}]
    req = processor.process("r3", ChatPrompt(messages), SamplingParams())
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert req.prompt == rendered and rendered.endswith("<|im_start|>assistant\n")
    assert req.prompt_token_ids == tuple(tok.encode(rendered, add_special_tokens=False))
    req = processor.process("r4", ChatPrompt(messages, add_generation_prompt=False), SamplingParams())
    assert not (req.prompt or "").endswith("assistant\n")
    # A prefill of the answer: the last message is left open for the model to continue.
    prefill = [*messages, {"role": "assistant", "content": "The answer is"}]
    req = processor.process("r5", ChatPrompt(prefill, False, continue_final_message=True), SamplingParams())
    assert req.prompt == tok.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    assert (req.prompt or "").endswith("The answer is")


def test_truncate_prompt_tokens_keeps_the_last_tokens(processor: InputProcessor) -> None:
    ids = list(range(100, 200))  # 100 tokens: over the context of 64
    req = processor.process("t1", ids, SamplingParams(truncate_prompt_tokens=10))
    assert req.prompt_token_ids == tuple(ids[-10:])
    req = processor.process("t2", ids, SamplingParams(truncate_prompt_tokens=-1, max_tokens=1))
    assert req.prompt_token_ids == tuple(ids[-63:])  # the context less one output token
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        processor.process("t3", ids, SamplingParams(truncate_prompt_tokens=64))
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_fan_out_with_seeds(processor: InputProcessor) -> None:
    req = processor.process("r", "x", SamplingParams(n=3, seed=7, temperature=1.0))
    assert req.child_ids == ["r#0", "r#1", "r#2"]
    assert [c.params.seed for c in req.core_requests] == [7, 8, 9]
    assert all(c.params.n == 1 for c in req.core_requests)
    assert req.params.n == 3
    req = processor.process("u", "x", SamplingParams(n=2))
    assert [c.params.seed for c in req.core_requests] == [None, None]


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt_token_ids"),
        ([5] * 64, SamplingParams(), "prompt_token_ids"),
        ("word " * 80, SamplingParams(), "prompt"),
        ([1, VOCAB], SamplingParams(), "prompt_token_ids"),
        ([-1], SamplingParams(), "prompt_token_ids"),
        ([1, "a"], SamplingParams(), "prompt_token_ids"),
        (ChatPrompt([]), SamplingParams(), "messages"),
        ("x", SamplingParams(stop_token_ids=[VOCAB + 1]), "stop_token_ids"),
        ("x", SamplingParams(logit_bias={VOCAB: 1.0}), "logit_bias"),
    ],
)
def test_invalid_input_names_the_field(
    processor: InputProcessor, prompt: Any, params: SamplingParams, field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        processor.process("bad", prompt, params)


def out(rid: str, tokens: list[int], finish: FinishReason | None = None, **kw: Any) -> EngineCoreOutput:
    return EngineCoreOutput(rid, tuple(tokens), finish_reason=finish, **kw)


def test_delta_outputs_aggregate_samples(processor: InputProcessor, smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    a, b = tok.encode(" one two"), tok.encode(" 世界")
    op = OutputProcessor(tok)
    op.add_request(processor.process("r", "x", SamplingParams(n=2, max_tokens=8)), OutputKind.DELTA)
    with pytest.raises(ValueError, match="request_id"):
        op.add_request(processor.process("r", "x", SamplingParams()), OutputKind.DELTA)

    res = op.process_outputs([out("r#0", a[:1], num_cached_tokens=16)])
    (ro,) = res.request_outputs
    assert [c.index for c in ro.outputs] == [0] and ro.outputs[0].text == " one"
    assert ro.num_cached_tokens == 16 and not ro.finished

    texts = {0: " one", 1: ""}
    for t0, t1 in zip(a[1:] + [None] * 5, b, strict=False):  # noqa: B905
        outs = [] if t0 is None else [out("r#0", [t0], FinishReason.LENGTH if t0 == a[-1] else None)]
        outs.append(out("r#1", [t1]))
        (ro,) = op.process_outputs(outs).request_outputs
        for c in ro.outputs:
            texts[c.index] += c.text
            assert "\ufffd" not in c.text
    (ro,) = op.process_outputs([out("r#1", [2], FinishReason.STOP, stop_token_id=None)]).request_outputs
    assert ro.finished and [c.index for c in ro.outputs] == [1] and ro.outputs[0].finish_reason == "stop"
    assert texts == {0: " one two", 1: " 世界"}
    assert op.num_unfinished == 0
    assert op.process_outputs([out("r#1", [5])]).request_outputs == []  # finished: ignored


def test_stop_string_finishes_and_asks_for_abort(processor: InputProcessor, smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode(" alpha beta gamma delta")
    op = OutputProcessor(tok)
    op.add_request(processor.process("s", "x", SamplingParams(stop=["a gam"])), OutputKind.CUMULATIVE)
    res = op.process_outputs([out("s", ids)])  # several tokens in one output
    (ro,) = res.request_outputs
    assert res.reqs_to_abort == ["s"]
    c = ro.outputs[0]
    assert ro.finished and c.finish_reason == "stop" and c.stop_reason == "a gam"
    assert c.text == " alpha bet"
    assert tok.decode(c.token_ids) == " alpha beta gamma"  # up to the token completing the stop


@pytest.mark.parametrize(
    ("params", "token", "reason"),
    [
        (SamplingParams(stop_token_ids=[7]), 7, 7),  # one of the request's stop token ids: the reason
        (SamplingParams(stop_token_ids=[7]), 2, None),  # the model's EOS: none (vLLM's rule)
        (SamplingParams(stop_token_ids=[2]), 2, 2),  # EOS named by the request: the reason
    ],
)
def test_stop_reason_is_a_requested_stop_token_not_the_eos(
    processor: InputProcessor, smollm2_tokenizer: Any, params: SamplingParams, token: int, reason: int | None
) -> None:
    op = OutputProcessor(smollm2_tokenizer)
    op.add_request(processor.process("t", "x", params), OutputKind.CUMULATIVE)
    finished = out("t", [11, token], FinishReason.STOP, stop_token_id=token)
    (ro,) = op.process_outputs([finished]).request_outputs
    c = ro.outputs[0]
    assert ro.finished and c.finish_reason == "stop" and c.stop_reason == reason


def test_logprobs_and_final_only(processor: InputProcessor, smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    op = OutputProcessor(tok)
    op.add_request(processor.process("l", "x", SamplingParams(logprobs=2)), OutputKind.FINAL_ONLY)
    lp1 = TokenLogprobs(token_id=100, logprob=-0.5, rank=2, top=((7, -0.1), (100, -0.5)))
    lp2 = TokenLogprobs(token_id=9, logprob=-0.25, rank=1, top=((9, -0.25), (3, -2.0)))
    assert op.process_outputs([out("l", [100], new_logprobs=(lp1,))]).request_outputs == []
    (ro,) = op.process_outputs([out("l", [9], FinishReason.LENGTH, new_logprobs=(lp2,))]).request_outputs
    c = ro.outputs[0]
    assert c.token_ids == [100, 9] and c.cumulative_logprob == pytest.approx(-0.75)
    assert c.logprobs is not None
    assert list(c.logprobs[0]) == [100, 7]
    assert c.logprobs[0][100].rank == 2 and c.logprobs[0][7].rank == 1
    assert c.logprobs[0][7].decoded_token == tok.decode([7])
    assert list(c.logprobs[1]) == [9, 3] and c.logprobs[1][3].logprob == -2.0


def test_abort_request(processor: InputProcessor, smollm2_tokenizer: Any) -> None:
    op = OutputProcessor(smollm2_tokenizer)
    op.add_request(processor.process("a", "x", SamplingParams(n=2)), OutputKind.DELTA)
    op.process_outputs([out("a#0", [5], FinishReason.LENGTH)])
    core_ids, final = op.abort_request("a")
    assert core_ids == ["a#1"]
    assert final is not None and final.finished and [c.finish_reason for c in final.outputs] == ["abort"]
    assert op.abort_request("a") == ([], None) and op.num_unfinished == 0


def test_tools_tool_calls_and_template_kwargs_render_as_the_router_renders(
        smollm2_tokenizer: Any) -> None:
    """``LLM.chat``'s tools and chat_template_kwargs reach the template on the worker exactly as
    on the router (one ``template_messages`` and one reserved-name rule); an assistant turn of
    tool calls may have no content."""
    import copy

    from router.tokenizers import RouterTokenizer

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: "
        "{{ m.content }}{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}{% endfor %}\n{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}NO THINKING{% endif %}")
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    call = {"id": "1", "type": "function", "function": {"name": "get_time", "arguments": {}}}
    chat = ChatPrompt(({"role": "user", "content": "time?"},
                       {"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "content": "noon", "tool_call_id": "1"}),
                      tools=(tool,), template_kwargs={"enable_thinking": False})
    worker = InputProcessor(tok, VOCAB, max_model_len=512, eos_token_ids=frozenset({2}))
    text = worker.render_chat(chat)
    assert text.startswith("TOOLS [{") and "assistant: CALL get_time {}" in text
    assert text.endswith("NO THINKING")
    assert list(worker.tokenize(chat)[1]) == RouterTokenizer(tok).encode(chat)
    with pytest.raises(ValueError, match="^chat_template_kwargs: 'tokenize' cannot be set"):
        worker.render_chat(ChatPrompt(chat.messages, template_kwargs={"tokenize": True}))
