"""Draft-model proposer: a small model with the target's tokenizer drafts ``k`` tokens greedily.

The draft model runs in a :class:`~gpu_worker.worker.model_runner.ModelRunner` of its own, on
the engine core's device, with a paged KV pool of its own, as many blocks as the target's
(a small model's blocks are a fraction of the target's bytes). Its blocks are managed by a
:class:`~gpu_worker.core.kv_cache_manager.KVCacheManager` of its own, with prefix caching over
the same hash chain as the target's, through one *mirror* :class:`~gpu_worker.core.request.Request`
per target request: the mirror holds the target's accepted tokens, and its
``num_computed_tokens`` counts the leading positions whose draft K/V is valid.

Why not the target's block tables (as vLLM does for its draft layers)? The draft computes a
request's K/V lazily, when it drafts for it, and its own drafts make its valid prefix differ
from the target's: sharing tables would need lookahead slots in the target's allocation and
would let the target's prefix hits serve draft K/V nobody computed. With its own manager every
draft block is exactly accounted for (freed when the request ends; prefix hits only on
blocks the draft computed), and the target's scheduler knows nothing of the draft.

One proposal (when a step is planned), batched over the requests: each request feeds the tokens
the draft has not computed (its last token at least; after a preemption or prefix hit of the
target nothing changes here), chunked under the token budget, samples draft 1 from the last of
them, then feeds each draft to get the next (``k`` forwards in all when caught up). Drafts fed
as inputs stay valid when the target accepts them, and are checked at the next proposal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpu_worker.core.kv_cache_manager import KVCacheManager
from gpu_worker.core.request import Request
from gpu_worker.core.types import ScheduledRequest, SchedulerOutput
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.spec_decode.proposer import DraftProposer
from gpu_worker.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)


@dataclass
class _DraftSeq:
    """The draft's view of one target request."""

    mirror: Request  # the target's accepted tokens; num_computed_tokens: valid draft K/V
    drafted_at: int = 0  # position of the first draft fed as an input in the last proposal
    fed_drafts: list[int] = field(default_factory=list)  # drafts fed as inputs (valid if accepted)


@dataclass
class _Round:
    """One request's part of a proposal."""

    seq: _DraftSeq
    k: int
    feed: list[int]  # tokens still to feed (known tokens, then the latest draft)
    position: int  # position of feed[0]
    drafts: list[int] = field(default_factory=list)
    registered: bool = False  # the draft runner has this request's row in this proposal


class DraftModelProposer(DraftProposer):
    """Drafts with ``runner`` (the draft model, its KV pool initialized)."""

    def __init__(
        self, runner: ModelRunner, num_speculative_tokens: int, hash_seed: str, target_vocab_size: int
    ) -> None:
        self.runner = runner
        self.num_speculative_tokens = num_speculative_tokens
        self.block_size = runner.block_size
        self.hash_seed = hash_seed
        self.target_vocab_size = target_vocab_size
        self.token_budget = runner.config.token_budget
        self.kv = KVCacheManager(runner.num_kv_blocks, self.block_size, record_events=False)
        self._seqs: dict[str, _DraftSeq] = {}

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        rounds: list[_Round | None] = []
        for request, limit in zip(requests, max_drafts, strict=True):
            seq = self._sync(request)
            k = min(limit, self.num_speculative_tokens)
            rounds.append(self._reserve(seq, k) if k > 0 else None)
        live = [r for r in rounds if r is not None]
        if live:
            try:
                self._run(live)
            finally:  # the draft runner keeps no rows between proposals
                done = frozenset(r.seq.mirror.request_id for r in live)
                self.runner.execute(SchedulerOutput((), 0, finished_req_ids=done))
            for r in live:
                self._commit(r)
        return [[] if r is None else r.drafts for r in rounds]

    def drop(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            seq = self._seqs.pop(rid, None)
            if seq is not None:
                self.kv.free(seq.mirror)

    def _sync(self, request: Request) -> _DraftSeq:
        """The request's draft view, its mirror brought up to the target's tokens, with the valid
        prefix cut at the first draft fed last time that the target did not accept."""
        seq = self._seqs.get(request.request_id)
        if seq is None:
            mirror = Request(
                request.request_id, request.prompt_token_ids, _GREEDY, block_size=self.block_size,
                hash_seed=self.hash_seed, output_token_ids=request.output_token_ids,
            )
            seq = self._seqs[request.request_id] = _DraftSeq(mirror)
            return seq
        mirror, tokens = seq.mirror, request.all_token_ids
        for token_id in tokens[mirror.num_tokens :]:
            mirror.append_output_token(token_id)
        valid = mirror.num_computed_tokens
        for j, draft in enumerate(seq.fed_drafts):
            position = seq.drafted_at + j
            if position != valid or position >= len(tokens) - 1 or tokens[position] != draft:
                break
            valid += 1
        mirror.num_computed_tokens = valid
        seq.fed_drafts = []
        return seq

    def _reserve(self, seq: _DraftSeq, k: int) -> _Round | None:
        """Blocks for the tokens to feed (uncomputed known tokens, then ``k - 1`` drafts); None
        (no drafts this time) when the draft pool is full."""
        mirror = seq.mirror
        cached_ids: list[int] = []
        start = mirror.num_computed_tokens
        if not self.kv.block_ids(mirror):  # new (or its pool was full so far): look for a prefix hit
            mirror.num_computed_tokens = 0
            cached_ids, start = self.kv.match_prefix(mirror)
        if self.kv.allocate(mirror, mirror.num_tokens - start + k - 1, cached_ids) is None:
            return None
        mirror.num_computed_tokens = start
        return _Round(seq, k, list(mirror.all_token_ids[start:]), start)

    def _run(self, rounds: list[_Round]) -> None:
        """Forwards until every request has its drafts: catch-up chunks, then one token each."""
        pending = rounds
        while pending:
            budget = self.token_budget
            entries, by_id = [], {}
            for r in pending:
                n = min(len(r.feed), budget)
                if n == 0:
                    break
                rid = r.seq.mirror.request_id
                tokens, r.feed = r.feed[:n], r.feed[n:]
                entries.append(ScheduledRequest(
                    rid, tuple(tokens), r.position,
                    () if r.registered else tuple(self.kv.block_ids(r.seq.mirror)),
                    sample=not r.feed, is_new=not r.registered, params=_GREEDY,
                ))
                r.registered, r.position, by_id[rid] = True, r.position + n, r
                budget -= n
            out = self.runner.execute(SchedulerOutput(tuple(entries), self.token_budget - budget))
            for rid, token_id in zip(out.req_ids, out.sampled_token_ids, strict=True):
                r = by_id[rid]
                if token_id >= self.target_vocab_size:  # outside the target's vocabulary: stop here
                    r.k = len(r.drafts)
                    continue
                r.drafts.append(token_id)
                if len(r.drafts) < r.k:
                    r.feed = [token_id]
            pending = [r for r in pending if len(r.drafts) < r.k]

    def _commit(self, r: _Round) -> None:
        """After a proposal: every known token's draft K/V is valid; the fed drafts maybe."""
        mirror = r.seq.mirror
        mirror.num_computed_tokens = mirror.num_tokens
        self.kv.commit_computed(mirror)
        r.seq.drafted_at = mirror.num_tokens
        r.seq.fed_drafts = r.drafts[: r.k - 1]
