"""``truncate_prompt``: vLLM's ``truncate_prompt_tokens``, the one rule router and worker apply."""

from __future__ import annotations

import pytest

from llmserve.prompt_input import truncate_prompt


@pytest.mark.parametrize(
    ("ids", "keep", "expected"),
    [
        ([1, 2, 3, 4, 5], None, [1, 2, 3, 4, 5]),  # unset: as they are
        ([1, 2, 3, 4, 5], 2, [4, 5]),  # the last ones (left truncation)
        ([1, 2, 3], 5, [1, 2, 3]),  # not longer: as they are
        (list(range(20)), -1, list(range(11, 20))),  # -1: the context (10) less one output token
    ],
)
def test_truncate_keeps_the_last_tokens(ids: list[int], keep: int | None, expected: list[int]) -> None:
    assert list(truncate_prompt(ids, keep, max_model_len=10)) == expected


@pytest.mark.parametrize("keep", [0, -2, 10, 11])
def test_a_truncation_leaving_no_room_for_output_is_refused(keep: int) -> None:
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens must be -1 or in \[1, 10\)"):
        truncate_prompt([1, 2, 3], keep, max_model_len=10)
