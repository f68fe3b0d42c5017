"""The text of a resumed stream (issue 17, finding 6): an ``OutputProcessor`` that starts with the
tokens another worker already sent continues the text exactly where that worker's stopped, at
every split point, including inside multibyte characters (held-back bytes) and stop strings.

The tokens come from the real SmolLM2 tokenizer, so characters do split across tokens."""

from __future__ import annotations

from typing import Any

import pytest

from gpu_worker.core.types import EngineCoreOutput, EngineCoreRequest, FinishReason
from gpu_worker.engine.output_processor import OutputKind, OutputProcessor
from gpu_worker.engine.processor import ProcessedRequest
from gpu_worker.sampling_params import SamplingParams

TEXT = "Héllo 世界 🎉🎉 naïve — ok 😀 Привет мир! 日本語のテキスト 👩‍👩‍👧 done STOP here."


def _stream(tok: Any, prompt: list[int], ids: list[int], params: SamplingParams,
            resumed: list[int]) -> tuple[list[str], str | None, list[int]]:
    """Text deltas, finish reason and token ids of ``ids`` through a fresh processor that starts
    after ``resumed`` (one core output per token, as the engine sends them)."""
    processor = OutputProcessor(tok)
    core = EngineCoreRequest("r", tuple(prompt), params, output_token_ids=tuple(resumed))
    processor.add_request(ProcessedRequest("r", None, tuple(prompt), params, (core,), tuple(resumed)),
                          OutputKind.DELTA)
    deltas: list[str] = []
    tokens: list[int] = []
    finish = None
    for i, token_id in enumerate(ids):
        last = i == len(ids) - 1
        out = EngineCoreOutput("r", (token_id,), finish_reason=FinishReason.LENGTH if last else None)
        for result in processor.process_outputs([out]).request_outputs:
            completion = result.outputs[0]
            deltas.append(completion.text)
            tokens.extend(completion.token_ids)
            finish = completion.finish_reason
        if finish is not None:
            break
    return deltas, finish, tokens


@pytest.mark.parametrize("stop", [[], ["STOP"], ["🎉🎉 na"]], ids=["no stop", "stop string", "emoji stop"])
def test_resumed_text_continues_at_every_split(smollm2_tokenizer: Any, stop: list[str]) -> None:
    tok = smollm2_tokenizer
    prompt = tok.encode("Say something:")
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([t]) for t in ids), "characters split across tokens"
    params = SamplingParams(max_tokens=len(ids), stop=stop)
    full, full_finish, full_tokens = _stream(tok, prompt, ids, params, [])
    whole = "".join(full)
    assert (full_finish == "stop") == bool(stop)
    held = 0
    for k in range(1, len(full_tokens)):
        # What the client had after k tokens: the deltas of the first k outputs.
        sent = "".join(full[:k])
        held += full[k - 1] == ""
        rest, finish, tokens = _stream(tok, prompt, ids[k:], params, ids[:k])
        assert sent + "".join(rest) == whole, f"split after {k} tokens"
        assert ids[:k] + tokens == full_tokens and finish == full_finish
    assert held > 0, "some splits fell where text was held back"
