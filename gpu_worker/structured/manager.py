"""The engine core's structured-output collaborator: compile on admission, mask every step.

Lifecycle of a constrained sequence:

1. :meth:`StructuredOutputManager.add` (when the core queues it) asks the :class:`GrammarCache`
   for its grammar: a future, compiled on a thread pool. The scheduler's ``ready`` gate
   (:meth:`StructuredOutputManager.is_ready`) keeps it waiting, without holding up anyone else,
   until the future is done.
2. Each step, :meth:`StructuredOutputManager.prepare_step` (between ``schedule()`` and the
   runner) brings the matcher of every constrained sequence that samples in that step up to
   date with the tokens the scheduler accepted for it (``Request.output_token_ids``: the
   matcher has always accepted exactly a prefix of them, so preemption, which recomputes KV
   but keeps the outputs, needs no rollback, and a resumed stream's earlier outputs are
   replayed the same way), then fills one bitmask row per such sequence and attaches the
   batch's :class:`~gpu_worker.core.types.GrammarBitmask` to the step.
3. The scheduler never plans a constrained sequence while a token sampled for it is still in
   flight (async scheduling): its mask depends on that token.
4. When the grammar is complete the mask allows only the stop tokens (EOS), so the scheduler
   finishes the sequence with ``stop``. State is dropped with the step's ``finished_req_ids``.
5. Speculative decoding: :meth:`StructuredOutputManager.validate_drafts` cuts a sequence's drafts
   at the first one its grammar forbids (when the step is planned), and ``prepare_step`` fills
   one bitmask row per verified position (the matcher accepts the drafts one by one, then rolls
   them back): the target can only accept drafts the grammar allows, and the matcher still
   accepts exactly the tokens the scheduler keeps (step 2).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from gpu_worker.core.request import Request
from gpu_worker.core.types import EngineCoreRequest, GrammarBitmask, SchedulerOutput
from gpu_worker.structured.grammar import GrammarCache, error_message

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.002


class _Sequence:
    """One constrained sequence: its grammar (future), then its matcher."""

    __slots__ = ("future", "matcher", "num_accepted", "broken")

    def __init__(self, future: Future[Any]) -> None:
        self.future = future
        self.matcher: Any = None
        self.num_accepted = 0  # output tokens the matcher has accepted
        self.broken = False  # compile failed or a token was rejected: only stop tokens allowed


class StructuredOutputManager:
    """Grammar futures and matchers of the constrained sequences of one engine core.

    ``tokenizer`` is the model's (None: the model has no tokenizer, and the front refuses
    structured output). Used from the engine-core thread only.
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = 256
    ) -> None:
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(sorted(stop_token_ids))
        self._tokenizer = tokenizer
        self._cache_size = cache_size
        self._cache: GrammarCache | None = None
        self._sequences: dict[str, _Sequence] = {}

    @property
    def cache(self) -> GrammarCache:
        if self._cache is None:
            if self._tokenizer is None:
                raise ValueError("structured_output: this model has no tokenizer")
            self._cache = GrammarCache(
                self._tokenizer, self.vocab_size, self.stop_token_ids, capacity=self._cache_size
            )
        return self._cache

    @property
    def num_sequences(self) -> int:
        return len(self._sequences)

    def add(self, request: EngineCoreRequest) -> None:
        """Start compiling the grammar of a constrained request (no-op for the others)."""
        spec = request.params.structured_output
        if spec is not None:
            self._sequences[request.request_id] = _Sequence(self.cache.get(spec))

    def is_ready(self, request: Request) -> bool:
        """The scheduler's gate: False while the request's grammar is still compiling."""
        seq = self._sequences.get(request.request_id)
        return seq is None or seq.future.done()

    def remove(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._sequences.pop(rid, None)

    def validate_drafts(self, requests: Sequence[Request], drafts: list[list[int]]) -> list[list[int]]:
        """Each request's drafts up to the first its grammar forbids (unconstrained: unchanged)."""
        if not self._sequences:
            return drafts
        out = []
        for request, proposed in zip(requests, drafts, strict=True):
            seq = self._sequences.get(request.request_id)
            if seq is None or not proposed:
                out.append(proposed)
                continue
            self._catch_up(request.request_id, seq, request.output_token_ids)
            num_ok = 0
            if not seq.broken:
                for token_id in proposed:
                    if not seq.matcher.accept_token(token_id):
                        break
                    num_ok += 1
                if num_ok:
                    seq.matcher.rollback(num_ok)
            out.append(proposed[:num_ok])
        return out

    def prepare_step(
        self, sched: SchedulerOutput, lookup: Callable[[str], Request | None]
    ) -> SchedulerOutput:
        """``sched`` with the bitmask of its constrained sampled rows (unchanged if none).

        An empty step while grammars compile waits up to ``_IDLE_WAIT_S`` for one of them, so
        an engine with nothing else to do does not spin against the compiling threads."""
        self.remove(sched.finished_req_ids)
        if not self._sequences:
            return sched
        if sched.is_empty:
            compiling = [seq.future for seq in self._sequences.values() if not seq.future.done()]
            if compiling:
                wait(compiling, timeout=_IDLE_WAIT_S, return_when=FIRST_COMPLETED)
            return sched
        rows = [
            (r.req_id, seq, r.token_ids[len(r.token_ids) - r.num_draft_tokens :])
            for r in sched.requests
            if r.sample and (seq := self._sequences.get(r.req_id)) is not None
        ]
        if not rows:
            return sched
        import xgrammar as xgr

        counts = tuple(1 + len(drafts) for _, _, drafts in rows)
        bitmask = xgr.allocate_token_bitmask(sum(counts), self.vocab_size)
        first = 0
        for rid, seq, drafts in rows:
            request = lookup(rid)
            if request is not None:
                self._catch_up(rid, seq, request.output_token_ids)
            self._fill_rows(seq, drafts, bitmask, first)
            first += 1 + len(drafts)
        grammar = GrammarBitmask(
            tuple(rid for rid, _, _ in rows), bitmask.numpy(), row_counts=counts if first > len(rows) else ()
        )
        return dataclasses.replace(sched, grammar=grammar)

    def _fill_rows(self, seq: _Sequence, drafts: tuple[int, ...], bitmask: Any, first: int) -> None:
        """The mask of the sequence's next token, then (drafts) of each verified position after it."""
        num_ok = 0
        for j in range(len(drafts) + 1):
            if seq.broken or j > num_ok:  # after a draft the grammar forbids nothing counts
                self._allow_only_stop(bitmask, first + j)
                continue
            seq.matcher.fill_next_token_bitmask(bitmask, first + j)
            if j < len(drafts) and seq.matcher.accept_token(drafts[j]):
                num_ok += 1
        if num_ok:
            seq.matcher.rollback(num_ok)

    def _catch_up(self, rid: str, seq: _Sequence, output_token_ids: list[int]) -> None:
        if seq.broken:
            return
        if seq.matcher is None:
            try:
                import xgrammar as xgr

                seq.matcher = xgr.GrammarMatcher(seq.future.result())
            except Exception as exc:  # noqa: BLE001 - the front's syntax check makes this rare
                logger.error("request %s: its grammar failed to compile: %s", rid, error_message(exc))
                seq.broken = True
                return
        for token_id in output_token_ids[seq.num_accepted :]:
            if not seq.matcher.accept_token(token_id):
                logger.error("request %s: token %d breaks its grammar; ending it", rid, token_id)
                seq.broken = True
                return
            seq.num_accepted += 1

    def _allow_only_stop(self, bitmask: Any, row: int) -> None:
        bitmask[row] = 0
        for token_id in self.stop_token_ids:
            bit = 1 << (token_id % 32)
            bitmask[row, token_id // 32] |= bit - (1 << 32 if bit >= 1 << 31 else 0)  # as int32

    def shutdown(self) -> None:
        if self._cache is not None:
            self._cache.shutdown()
