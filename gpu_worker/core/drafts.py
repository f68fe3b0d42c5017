"""The scheduler's side of speculative decoding: ask for drafts when a step is planned, count
what verification accepted (pure Python, no torch).

A running request gets drafts only when it decodes with nothing in flight: exactly one token
to compute (its last), no step in flight for it. The proposer (n-gram, draft model, behind the
engine core's grammar check: ``gpu_worker/spec_decode/``) sees those requests and the most
drafts each may use, so that its tokens can never run past ``max_tokens`` or ``max_model_len``
even when every draft and the bonus token are accepted; it is told at once when a request ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from gpu_worker.core.request import Request
from gpu_worker.core.types import SpecDecodeStats


class DraftSource(Protocol):
    """What the scheduler needs of a proposer (``gpu_worker.spec_decode.proposer.DraftProposer``)."""

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        """One list of drafts (maybe empty, at most ``max_drafts[i]``) per request."""
        ...

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget requests that ended (finished or aborted)."""
        ...


def max_drafts(request: Request, max_model_len: int) -> int:
    """Drafts a decoding request can use: the step emits accepted drafts + one token, and must
    leave the request within ``max_tokens`` and ``max_model_len`` (0: no room for any)."""
    room = max_model_len - request.num_tokens - 1
    max_tokens = request.params.max_tokens
    if max_tokens is not None:
        room = min(room, max_tokens - request.num_output_tokens - 1)
    return max(room, 0)


def wants_drafts(request: Request) -> bool:
    """A decode with nothing in flight, whose sampling speculation supports: plug-in logits
    processors see one row per request and step, so their requests never speculate."""
    return (
        request.num_tokens - request.num_computed_tokens == 1
        and request.num_inflight_tokens == 0
        and request.num_pending_outputs == 0
        and not request.params.logits_processors
    )


class DraftPlanner:
    """Fills ``Request.spec_token_ids`` of the decoding requests before a step is planned, and
    keeps the :class:`SpecDecodeStats` of verified steps."""

    def __init__(self, proposer: DraftSource) -> None:
        self.proposer = proposer
        self._num_drafts = 0
        self._num_draft_tokens = 0
        self._num_accepted = 0
        self._accepted_per_pos: list[int] = []

    def plan(self, running: Sequence[Request], max_model_len: int) -> None:
        """Ask for drafts of every running request that can use some."""
        requests, limits = [], []
        for request in running:
            request.spec_token_ids = []
            if not wants_drafts(request):
                continue
            limit = max_drafts(request, max_model_len)
            if limit > 0:
                requests.append(request)
                limits.append(limit)
        if not requests:
            return
        proposed = self.proposer.propose(requests, limits)
        for request, limit, drafts in zip(requests, limits, proposed, strict=True):
            request.spec_token_ids = list(drafts[:limit])

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """A request's step verified ``num_draft_tokens`` drafts and accepted the first ``num_accepted``."""
        self._num_drafts += 1
        self._num_draft_tokens += num_draft_tokens
        self._num_accepted += num_accepted
        if len(self._accepted_per_pos) < num_draft_tokens:
            self._accepted_per_pos.extend([0] * (num_draft_tokens - len(self._accepted_per_pos)))
        for pos in range(num_accepted):
            self._accepted_per_pos[pos] += 1

    def stats(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            self._num_drafts, self._num_draft_tokens, self._num_accepted, tuple(self._accepted_per_pos)
        )
