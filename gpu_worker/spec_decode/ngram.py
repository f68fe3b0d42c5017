"""N-gram (prompt lookup) proposer: copy what followed the last n tokens the previous time.

Copy-heavy work (editing code, summarizing with quotes, extraction) repeats long runs of the
prompt; when the sequence's last ``n`` tokens occurred before, the tokens that followed them are
a cheap, often right guess. No model runs: a vectorized search over the request's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from gpu_worker.core.request import Request
from gpu_worker.spec_decode.proposer import DraftProposer


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The ``k`` tokens (or fewer, at the end of ``tokens``) that followed the latest earlier
    occurrence of the last ``n`` tokens, for the largest ``n`` in ``[min_n, max_n]`` that has one."""
    length = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        # An occurrence ends at e (inclusive), n - 1 <= e <= length - 2, so one token follows it.
        ends = np.flatnonzero(tokens[n - 1 : length - 1] == suffix[-1]) + (n - 1)
        for e in ends[::-1].tolist():  # latest first
            if np.array_equal(tokens[e - n + 1 : e + 1], suffix):
                return tokens[e + 1 : e + 1 + k].tolist()  # type: ignore[no-any-return]
    return []


class _TokenBuffer:
    """A request's tokens as a growable int64 array (tokens only ever get appended)."""

    __slots__ = ("array", "length")

    def __init__(self) -> None:
        self.array = np.empty(256, dtype=np.int64)
        self.length = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if n > len(self.array):
            grown = np.empty(max(n, 2 * len(self.array)), dtype=np.int64)
            grown[: self.length] = self.array[: self.length]
            self.array = grown
        if n > self.length:
            self.array[self.length : n] = tokens[self.length :]
        self.length = n
        return self.array[:n]


class NgramProposer(DraftProposer):
    """Prompt lookup decoding over each request's prompt and output (vLLM's ``ngram`` method)."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.num_speculative_tokens = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self._buffers: dict[str, _TokenBuffer] = {}

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        out = []
        for request, k in zip(requests, max_drafts, strict=True):
            buffer = self._buffers.get(request.request_id)
            if buffer is None:
                buffer = self._buffers[request.request_id] = _TokenBuffer()
            tokens = buffer.sync(request.all_token_ids)
            out.append(ngram_lookup(tokens, self.min_n, self.max_n, min(k, self.num_speculative_tokens)))
        return out

    def drop(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._buffers.pop(rid, None)
