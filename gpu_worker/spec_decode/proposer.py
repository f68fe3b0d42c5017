"""The proposer interface: draft tokens for decoding requests, asked when a step is planned."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

from gpu_worker.core.request import Request


class DraftProposer(ABC):
    """Proposes up to ``max_drafts[i]`` tokens to follow ``requests[i]``'s tokens.

    Called by the scheduler (through the engine core) when it plans a step, for the running
    requests that decode in it (exactly one token to compute, nothing in flight). Requests are
    the scheduler's: read them, never write them. A proposer may keep per-request state; it is
    told when requests end (:meth:`drop`).
    """

    num_speculative_tokens: int

    @abstractmethod
    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        """One list of draft token ids per request (possibly empty, at most ``max_drafts[i]``)."""

    def drop(self, request_ids: Iterable[str]) -> None:  # noqa: B027 - stateless proposers keep nothing
        """Forget requests that ended (the scheduler calls it as they finish or are aborted)."""


ValidateFn = Callable[[Sequence[Request], list[list[int]]], list[list[int]]]


class GrammarCheckedProposer(DraftProposer):
    """Another proposer's drafts, cut by ``validate(requests, drafts)`` where a request's grammar
    forbids them (structured output: ``StructuredOutputManager.validate_drafts``)."""

    def __init__(self, inner: DraftProposer, validate: ValidateFn) -> None:
        self.inner = inner
        self.validate = validate
        self.num_speculative_tokens = inner.num_speculative_tokens

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        return self.validate(requests, self.inner.propose(requests, max_drafts))

    def drop(self, request_ids: Iterable[str]) -> None:
        self.inner.drop(request_ids)
