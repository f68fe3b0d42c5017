"""Test helpers for the engine core: a deterministic paged fake runner and leak checks.

Imported by the tests of this folder (``tests.gpu_worker.core.core_fakes``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gpu_worker.core.kv_cache_manager import KVCacheManager
from gpu_worker.core.request import Request
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.scheduling_policy import SchedulingPolicy
from gpu_worker.core.types import (
    PLACEHOLDER_TOKEN_ID,
    EngineCoreOutput,
    EngineCoreRequest,
    RunnerOutput,
    SchedulerOutput,
)
from gpu_worker.sampling_params import SamplingParams

VOCAB = 97


def next_token(seq: Sequence[int], vocab: int = VOCAB) -> int:
    """A deterministic 'model': the next token is a hash of the whole sequence."""
    digest = hashlib.blake2b(array("q", seq).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab


def core_request(
    rid: str,
    prompt: Sequence[int],
    priority: int = 0,
    arrival: float = 0.0,
    eos: Sequence[int] = (),
    **params: Any,
) -> EngineCoreRequest:
    return EngineCoreRequest(
        rid,
        tuple(prompt),
        SamplingParams(**params),
        eos_token_ids=frozenset(eos),
        arrival_time=arrival,
        priority=priority,
    )


class PagedFakeRunner:
    """Writes each token into its paged slot and 'attends' by reading the sequence back
    through the block table: a wrong block table or a stale cached block changes the output.
    It also checks positions: ``start_pos`` must equal the tokens it already holds.
    A placeholder token (async scheduling) becomes what the previous step sampled for the
    same request, as the real runner fills it on the device (KeyError if there is none).
    Draft tokens (speculative decoding) are verified greedily against ``model``, reading every
    position back through the block table: the longest agreeing prefix is accepted and the
    model's token after it returned."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        script: dict[str, list[int]] | None = None,
        model: Callable[[Sequence[int]], int] = next_token,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.tables: dict[str, list[int]] = {}
        self.num_written: dict[str, int] = {}
        self.script = script or {}  # per request: tokens to emit instead of next_token
        self.steps: list[SchedulerOutput] = []
        self.last_sampled: dict[str, int] = {}
        self.num_placeholders = 0

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.steps.append(out)
        for rid in out.finished_req_ids | out.preempted_req_ids:
            self.tables.pop(rid, None)
            self.num_written.pop(rid, None)
        ids: list[str] = []
        toks: list[int] = []
        accepted: list[tuple[int, ...]] = []
        for sr in out.requests:
            if sr.is_new:
                self.tables[sr.req_id] = list(sr.block_ids)
                self.num_written[sr.req_id] = sr.start_pos  # a prefix hit is already in the cache
            else:
                self.tables[sr.req_id].extend(sr.block_ids)
            if sr.start_pos != self.num_written[sr.req_id]:
                raise AssertionError(
                    f"{sr.req_id}: start_pos {sr.start_pos} != {self.num_written[sr.req_id]}"
                )
            table = self.tables[sr.req_id]
            for k, tok in enumerate(sr.token_ids):
                if tok == PLACEHOLDER_TOKEN_ID:
                    tok = self.last_sampled[sr.req_id]
                    self.num_placeholders += 1
                pos = sr.start_pos + k
                self.slots[table[pos // self.block_size]][pos % self.block_size] = tok
            end = sr.start_pos + len(sr.token_ids)
            self.num_written[sr.req_id] = end
            if sr.sample:
                seq = [self.slots[table[p // self.block_size]][p % self.block_size] for p in range(end)]
                ids.append(sr.req_id)
                first_draft = end - sr.num_draft_tokens
                ok = 0  # drafts accepted: the model agrees with each
                while ok < sr.num_draft_tokens and (
                    self.model(seq[: first_draft + ok]) == seq[first_draft + ok]  # type: ignore[arg-type]
                ):
                    ok += 1
                accepted.append(tuple(seq[first_draft : first_draft + ok]))  # type: ignore[arg-type]
                self.num_written[sr.req_id] = first_draft + ok  # rejected drafts' slots get rewritten
                toks.append(self._sample(sr.req_id, seq[: first_draft + ok]))  # type: ignore[arg-type]
        self.last_sampled = dict(zip(ids, toks, strict=True))
        if not any(sr.num_draft_tokens for sr in out.requests):
            accepted = []
        return RunnerOutput(tuple(ids), tuple(toks), accepted_draft_ids=tuple(accepted))

    def _sample(self, rid: str, seq: list[int]) -> int:
        scripted = self.script.get(rid)
        return scripted.pop(0) if scripted else self.model(seq)


class FnProposer:
    """A proposer made of a function (speculative decoding tests); remembers dropped requests."""

    def __init__(self, propose: Callable[[Sequence[Request], Sequence[int]], list[list[int]]]) -> None:
        self.propose = propose
        self.dropped: list[str] = []

    def drop(self, request_ids: Iterable[str]) -> None:
        self.dropped.extend(request_ids)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    enable_caching: bool = True,
    policy: SchedulingPolicy | None = None,
    ready: Callable[[Request], bool] | None = None,
    propose: Callable[[Sequence[Request], Sequence[int]], list[list[int]]] | None = None,
    proposer: FnProposer | None = None,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_caching)
    return Scheduler(
        kv, max_num_seqs, max_num_batched_tokens, max_model_len, block_size, "test-model", policy, ready,
        proposer=proposer if propose is None else FnProposer(propose),
    )


def run_to_completion(
    sched: Scheduler, runner: PagedFakeRunner, max_steps: int = 10_000, async_scheduling: bool = False
) -> dict[str, list[EngineCoreOutput]]:
    """Step until nothing is left; returns each request's outputs in order.

    ``async_scheduling``: as the engine core does then, step k+1 is scheduled and run before
    step k is accounted for (``update``)."""
    outputs: dict[str, list[EngineCoreOutput]] = {}
    in_flight: tuple[SchedulerOutput, RunnerOutput] | None = None
    for _ in range(max_steps):
        if not sched.has_unfinished() and in_flight is None:
            return outputs
        launched = None
        if sched.has_unfinished():
            out = sched.schedule()
            launched = (out, runner.execute(out))
        done = in_flight if async_scheduling else launched
        in_flight = launched if async_scheduling else None
        if done is not None:
            for o in sched.update(*done):
                outputs.setdefault(o.request_id, []).append(o)
    raise AssertionError("scheduler did not finish")


def tokens_of(outputs: dict[str, list[EngineCoreOutput]]) -> dict[str, list[int]]:
    return {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in outputs.items()}


def assert_no_leak(kv: KVCacheManager) -> None:
    """Every block back in the free list with ref count 0, no request holding a table."""
    pool = kv.pool
    assert [b.ref_cnt for b in pool.blocks] == [0] * pool.num_blocks
    assert sorted(pool.free_block_ids()) == list(range(pool.num_blocks))
    assert kv.num_free_blocks == pool.num_blocks
    assert kv.usage == 0.0
    assert kv.num_requests == 0
