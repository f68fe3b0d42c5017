"""Prompt lookup: the longest matching suffix n-gram, its latest earlier occurrence, what followed."""

from __future__ import annotations

import numpy as np

from gpu_worker.core.request import Request
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.spec_decode.ngram import NgramProposer, ngram_lookup


def lookup(tokens: list[int], min_n: int = 1, max_n: int = 3, k: int = 4) -> list[int]:
    return ngram_lookup(np.array(tokens, dtype=np.int64), min_n, max_n, k)


def test_copies_what_followed_the_last_tokens() -> None:
    assert lookup([1, 2, 3, 4, 5, 6, 9, 1, 2, 3]) == [4, 5, 6, 9]
    assert lookup([1, 2, 3, 4, 5, 6, 9, 1, 2, 3], k=2) == [4, 5]


def test_longest_ngram_wins_over_a_later_shorter_one() -> None:
    # "2 3" last occurred at index 5 (followed by 8); "1 2 3" only at 0 (followed by 4).
    assert lookup([1, 2, 3, 4, 0, 2, 3, 8, 1, 2, 3]) == [4, 0, 2, 3]
    assert lookup([1, 2, 3, 4, 0, 2, 3, 8, 1, 2, 3], max_n=2) == [8, 1, 2, 3]


def test_latest_occurrence_among_equal_lengths() -> None:
    assert lookup([7, 1, 7, 2, 7], max_n=1) == [2, 7]


def test_drafts_stop_at_the_end_of_the_sequence() -> None:
    assert lookup([5, 6, 5]) == [6, 5]  # overlapping runs are fine (periodic text)


def test_nothing_when_no_ngram_of_min_length_matches() -> None:
    assert lookup([1, 2, 3, 4]) == []
    assert lookup([1, 2, 9, 1, 2, 3], min_n=2) == []  # "3" alone never occurred before
    assert lookup([4]) == []
    assert lookup([1, 2, 1, 2], k=0) == []


def test_proposer_caps_drafts_and_follows_growing_requests() -> None:
    proposer = NgramProposer(num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=4)
    request = Request("r", [1, 2, 3, 4, 5, 6, 1, 2], SamplingParams(), block_size=4, hash_seed="m")
    assert proposer.propose([request], [10]) == [[3, 4, 5]]  # num_speculative_tokens
    assert proposer.propose([request], [1]) == [[3]]  # the request's own limit
    for token_id in [3, 4, 5]:
        request.append_output_token(token_id)
    assert proposer.propose([request], [10]) == [[6, 1, 2]]
    long = Request("long", list(range(300)) + [10, 11], SamplingParams(), block_size=4, hash_seed="m")
    assert proposer.propose([request, long], [10, 10]) == [[6, 1, 2], [12, 13, 14]]  # buffer growth
    proposer.drop(["r", "long", "unknown"])
    assert proposer.propose([request], [10]) == [[6, 1, 2]]  # rebuilt from the request
