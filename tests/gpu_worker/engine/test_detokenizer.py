"""IncrementalDetokenizer with the real SmolLM2 tokenizer: UTF-8 safety and stop strings."""

from __future__ import annotations

from typing import Any

import pytest

from gpu_worker.engine.detokenizer import IncrementalDetokenizer

MULTIBYTE = "Héllo 世界 🎉🎉 naïve — ok 😀 Привет мир! 日本語のテキスト 👩‍👩‍👧 done."


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = []
    for token_id in ids:
        stopped = detok.add_token(token_id)
        deltas.append(detok.take_delta())
        if stopped:
            break
    else:
        detok.finish()
        deltas.append(detok.take_delta())
    return deltas


def test_multibyte_characters_never_split(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    prompt = tok.encode("Say something:")
    ids = tok.encode(MULTIBYTE)
    # The tokenizer does split characters across tokens: the test is meaningful.
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = feed(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE == detok.text
    assert deltas.count("") > 0  # held back while a character was incomplete


def test_first_token_keeps_leading_space(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode(" world, hello")
    detok = IncrementalDetokenizer(tok, tok.encode("Hello"))
    assert "".join(feed(detok, ids)) == " world, hello"


def test_unfinished_character_is_flushed_at_finish(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode("ok 😀")
    detok = IncrementalDetokenizer(tok, [])
    for token_id in ids[:-1]:  # stop in the middle of the emoji
        detok.add_token(token_id)
    released = detok.take_delta()
    assert released == "ok"  # " \xf0\x9f.." (space + half the emoji) is one token: held back
    detok.finish()
    flushed = detok.take_delta()
    assert flushed.startswith(" ") and flushed.endswith("\ufffd")
    assert released + flushed == tok.decode(ids[:-1])


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(smollm2_tokenizer: Any, include: bool) -> None:
    tok = smollm2_tokenizer
    text = "The answer is forty-two. Then more text follows here."
    ids = tok.encode(text)
    stop = "two. Th"  # spans several tokens
    pieces = [tok.decode([t]) for t in ids]
    assert not any(stop in p for p in pieces)
    detok = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str_in_output=include)
    deltas = feed(detok, ids)
    expected = "The answer is forty-" + (stop if include else "")
    assert "".join(deltas) == expected == detok.text
    assert detok.stopped and detok.stop_reason == stop
    assert detok.add_token(ids[-1])  # later tokens are ignored
    assert detok.text == expected


def test_stop_prefix_is_held_back_then_released(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode("one two three")
    detok = IncrementalDetokenizer(tok, [], stop=[" two thousand", "xyz"])
    released = []
    for token_id in ids:
        assert not detok.add_token(token_id)
        released.append(detok.take_delta())
        # Never shows a tail that could still become a stop string.
        assert not detok.text.endswith((" ", " t", " tw", " two", " two "))
    detok.finish()
    released.append(detok.take_delta())
    assert "".join(released) == "one two three"
    assert not detok.stopped


def test_earliest_stop_string_wins_and_multibyte_stop(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode("alpha 世界 beta gamma")
    detok = IncrementalDetokenizer(tok, [], stop=["gamma", "界"])
    assert "".join(feed(detok, ids)) == "alpha 世"
    assert detok.stop_reason == "界"


def test_special_tokens_are_skipped(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode("hi there") + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(feed(detok, ids)) == "hi there"


class _DecodeOnly:
    """A tokenizer seen only through ``decode`` (what text_decoder's general path calls)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self._tokenizer.decode(ids, **kwargs))


def test_the_backend_decoder_gives_the_deltas_of_transformers_decode(smollm2_tokenizer: Any) -> None:
    """SmolLM2's is a transformers fast tokenizer: the detokenizer calls its Rust backend
    directly. Over random ids (special tokens, bytes of split characters, invalid UTF-8 runs),
    real multi-byte text and stop strings, every delta, the final text and the stop reason equal
    those of the same detokenizer going through ``tokenizer.decode``."""
    import random

    from gpu_worker.engine.detokenizer import text_decoder

    tok = smollm2_tokenizer
    rng = random.Random(3)
    specials = list(tok.all_special_ids)
    cases = [(tok.encode("Say:"), tok.encode(MULTIBYTE), ())]
    for i in range(150):
        ids = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(len(tok)) for _ in range(40)]
        stop = (tok.decode(ids[10:12]),) if i % 3 == 0 else ()
        cases.append(([rng.randrange(len(tok)) for _ in range(rng.randrange(8))], ids, stop))
    probe = [0, 1, 2] + specials
    want = tok.decode(probe, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert text_decoder(tok)(probe) == want
    assert text_decoder(tok).__name__ == "fast" and text_decoder(_DecodeOnly(tok)).__name__ == "general"
    for prompt, ids, stop in cases:
        fast = IncrementalDetokenizer(tok, prompt, stop)
        general = IncrementalDetokenizer(_DecodeOnly(tok), prompt, stop)
        assert feed(fast, ids) == feed(general, ids)
        assert (fast.text, fast.stop_reason) == (general.text, general.stop_reason)


def _held_reference(text: str, stops: list[str]) -> int:
    """The longest tail of ``text`` that is a proper prefix of a stop string, by brute force."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)


def test_held_back_tail_equals_the_brute_force_search(smollm2_tokenizer: Any) -> None:
    """Random texts over a tiny alphabet (many partial matches) and random stop strings: after
    every token the shown text is the decoded text less exactly the brute-force held tail, and a
    stop ends it at the earliest match."""
    import random

    tok = smollm2_tokenizer
    rng = random.Random(7)
    stopped_runs = 0
    for _ in range(60):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(5, 40)))
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(2, 9)))
                 for _ in range(rng.randint(1, 4))]
        detok = IncrementalDetokenizer(tok, [], stop=stops)
        for token_id in tok.encode(text):
            if detok.add_token(token_id):
                break
            full = detok._text
            assert detok.text == full[: len(full) - _held_reference(full, stops)]
        if detok.stopped:
            stopped_runs += 1
            first = min((text.find(s), s) for s in stops if s in text)
            assert detok.text == text[: first[0]]
    assert 0 < stopped_runs < 60  # both paths were exercised
