"""The scheduler's mutable view of one request.

A :class:`Request` is owned by the scheduler alone: the KV cache manager reads it (token ids,
block hashes, ``num_computed_tokens``) but never writes it, and the runner never sees it (it
learns from ``ScheduledRequest`` records).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import Any

from gpu_worker.core.types import EngineCoreRequest, ImageInput, TokenLogprobs
from gpu_worker.sampling_params import SamplingParams
from llmserve.hashing import BlockHash, block_hashes

log = logging.getLogger(__name__)


class RequestStatus(enum.Enum):
    """Lifecycle of a request inside the engine core."""

    WAITING = "waiting"  # queued, never admitted
    RUNNING = "running"  # admitted, holds KV blocks
    PREEMPTED = "preempted"  # evicted by recompute, queued again at the front
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"


class Request:
    """Prompt, generated tokens and progress of one sequence.

    Invariants: ``all_token_ids == prompt_token_ids + output_token_ids``;
    ``0 <= num_computed_tokens <= num_tokens``; ``block_hashes`` holds exactly one hash per
    full block of ``all_token_ids`` (prompt and output), chained from ``root_hash(hash_seed)``,
    and stays empty when ``hash_seed`` is None (prefix caching off: nothing reads them, and
    hashing 256 prompts of 512 tokens costs about 14 ms of CPU time).

    With async scheduling one step can be in flight while the next is scheduled:
    ``num_inflight_tokens`` are the tokens scheduled in that step (computed once the step
    is accounted for) and ``num_pending_outputs`` (0 or 1) says whether it samples a token
    for this request. A decode scheduled behind it computes that not-yet-known token (a
    placeholder the runner fills on the device). Both are 0 between synchronous steps.

    Speculative decoding: ``spec_token_ids`` are the drafts the proposer offered for the step
    being planned (consumed when it is built).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        params: SamplingParams,
        *,
        block_size: int,
        hash_seed: str | None,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float = 0.0,
        priority: int = 0,
        output_token_ids: Iterable[int] = (),
        lora_name: str = "",
        images: tuple[ImageInput, ...] = (),
    ) -> None:
        self.request_id = request_id
        self.lora_name = lora_name  # its LoRA adapter ("": the base model)
        self.images = images  # the prompt's images: their hashes join the blocks they overlap
        self.prompt_token_ids: tuple[int, ...] = tuple(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        # The token ids that stop the request (once min_tokens are out): read per token.
        self.stop_ids: frozenset[int] = frozenset(params.stop_token_ids).union(
            () if params.ignore_eos else eos_token_ids
        )
        self.arrival_time = arrival_time
        self.priority = priority
        self.rank: Any = 0  # the scheduling policy's rank (set by the scheduler when queued)
        self.order = 0  # the scheduler's tie-breaker among equal ranks (admission / preemption)
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.output_token_ids: list[int] = list(output_token_ids)  # non-empty: resumed elsewhere
        self.all_token_ids: list[int] = [*self.prompt_token_ids, *self.output_token_ids]
        self.num_computed_tokens = 0
        self.num_inflight_tokens = 0
        self.num_pending_outputs = 0
        self.spec_token_ids: list[int] = []
        self.num_cached_tokens = 0  # prefix-cache hit at the first admission (not after preemption)
        self.status = RequestStatus.WAITING
        self.stop_token_id: int | None = None
        self.unreported_device_s = 0.0  # step time attributed since the last output (Scheduler.update)
        # Prompt logprobs gathered so far (positions 1 .. in order; None: not asked for), and
        # whether they went out (on the first sampled output).
        self.prompt_logprobs: list[TokenLogprobs] | None = (
            None if params.prompt_logprobs is None else []
        )
        self.prompt_logprobs_sent = False
        self.block_hashes: list[BlockHash] = (
            [] if hash_seed is None else block_hashes(self.all_token_ids, block_size, hash_seed,
                                                      images=[i.span for i in images])
        )

    @classmethod
    def from_core_request(cls, core: EngineCoreRequest, block_size: int, hash_seed: str | None) -> Request:
        """Build the scheduler's state for a validated ``EngineCoreRequest``."""
        return cls(
            core.request_id,
            core.prompt_token_ids,
            core.params,
            block_size=block_size,
            hash_seed=hash_seed,
            eos_token_ids=core.eos_token_ids,
            arrival_time=core.arrival_time,
            priority=core.priority,
            output_token_ids=core.output_token_ids,
            lora_name=core.lora_name,
            images=core.images,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens whose K/V are computed or being computed by the step in flight."""
        return self.num_computed_tokens + self.num_inflight_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and some are still missing: every prompt position must
        be computed (a prefix-cache hit would skip them)."""
        acc = self.prompt_logprobs
        return acc is not None and len(acc) < len(self.prompt_token_ids) - 1

    def add_prompt_logprobs(self, first: int, logprobs: tuple[TokenLogprobs, ...]) -> None:
        """Record a step's prompt logprobs (positions ``first ..``). Positions already held are
        skipped: after a preemption the prompt is computed again, and a step planned before it
        may still report."""
        acc = self.prompt_logprobs
        if acc is None:
            return
        skip = len(acc) + 1 - first  # the next position wanted is len(acc) + 1
        if skip < 0:  # never by the scheduler's order; a request's bug must not end the engine
            log.error("request %s: prompt logprobs from position %d leave a gap after position %d; dropped",
                      self.request_id, first, len(acc))
            return
        acc.extend(logprobs[skip:])

    def take_prompt_logprobs(self) -> tuple[TokenLogprobs, ...] | None:
        """The prompt logprobs to put on the request's first sampled output (None afterwards, or
        when not asked for)."""
        if self.prompt_logprobs is None or self.prompt_logprobs_sent:
            return None
        if self.needs_prompt_logprobs:  # never by the scheduler's order: sent as they are
            log.error("request %s: sampled with %d of its %d prompt logprobs", self.request_id,
                      len(self.prompt_logprobs), len(self.prompt_token_ids) - 1)
        self.prompt_logprobs_sent = True
        return tuple(self.prompt_logprobs)

    def append_output_token(self, token_id: int) -> None:
        """Append a sampled token and extend the hash chain if a block became full."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if len(self.all_token_ids) % self.block_size == 0:
            self.hash_full_blocks()

    def hash_full_blocks(self) -> None:
        """Extend ``block_hashes`` over the full blocks of ``all_token_ids`` not hashed yet (the
        end of ``append_output_token``, which the scheduler's ``update`` loop inlines up to here).
        A no-op without a ``hash_seed``."""
        if self.hash_seed is None:
            return
        start = len(self.block_hashes)
        parent = self.block_hashes[-1] if self.block_hashes else None
        self.block_hashes.extend(
            block_hashes(self.all_token_ids, self.block_size, self.hash_seed, start=start, parent=parent,
                         images=[i.span for i in self.images] if self.images else ())
        )

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
