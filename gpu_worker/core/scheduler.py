"""The scheduler: decides, each step, which requests compute how many tokens (pure CPU).

There is no prefill phase and no decode phase: each scheduled request gets ``n`` tokens so that
``num_computed_tokens`` catches up with its length (prompt + output). A decode is ``n == 1``, a
long prompt is chunked under ``max_num_batched_tokens``, a prefix hit starts at the first
uncached token, and a preempted request simply starts again from the cached prefix.

One step: ``schedule()`` -> runner -> ``update(scheduler_output, runner_output)``. ``schedule``
does not advance ``num_computed_tokens``; ``update`` does. Synchronously the two calls
alternate. With async scheduling the engine core plans step k+1 while step k is in flight
(``schedule(k+1)`` comes before ``update(k)``): a request that step k samples for is then
scheduled for one more token, a placeholder (``PLACEHOLDER_TOKEN_ID``) the runner fills on
the device, unless that token already ends it by length. At most one step is in flight.
A request with structured output is never given a placeholder: the grammar mask of its next
token depends on the previous one, so it waits for that token (one step) before it is planned.

Speculative decoding (``proposer``, :mod:`gpu_worker.core.drafts`): when a step is planned, each
running request that decodes with nothing in flight may get drafts from the proposer and is
scheduled for its last token plus the drafts (budget permitting: drafts are cut first). The
runner verifies them in that one step; ``update`` advances ``num_computed_tokens`` by the
accepted tokens only, so rejected drafts' K/V never count as computed (their slots are
overwritten by later tokens, and never reach the prefix cache, which hashes computed tokens
of the request's accepted sequence only), and appends the accepted drafts plus the runner's
token, cut at a stop. With a proposer, requests get no placeholders (async scheduling): drafts
are proposed from a request's known tokens, and how many tokens a step with drafts adds is
unknown until it is accounted for; so with async scheduling a request is planned every other
step (the engine core turns async scheduling off by default when speculating).

Device time: ``update`` takes the step's device time (the engine core measures it) and splits it
over the step's requests in proportion to the tokens each computed in it; each request's
output carries what it was given since its previous output (``EngineCoreOutput.device_s``), a
finishing or aborted request's output the rest. The share of a request that ended before the
step's results (aborted, or finished by the step before under async scheduling) is dropped.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gpu_worker.core.drafts import DraftPlanner, DraftSource
from gpu_worker.core.kv_cache_manager import KVCacheManager
from gpu_worker.core.request import Request, RequestStatus
from gpu_worker.core.scheduling_policy import FCFSPolicy, SchedulingPolicy
from gpu_worker.core.types import (
    PLACEHOLDER_TOKEN_ID,
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
    StepColumns,
    TokenLogprobs,
)
from llmserve.kv_events import KVEvent


@dataclass
class _StepPlan:
    """What one ``schedule()`` call has decided so far (private, lives for one call)."""

    token_budget: int
    # (request, tokens this step, blocks appended this step, admitted this step)
    entries: list[tuple[Request, int, list[int], bool]] = field(default_factory=list)
    preempted: bool = False

    def add(self, request: Request, num_tokens: int, new_block_ids: list[int], admitted: bool) -> None:
        self.entries.append((request, num_tokens, new_block_ids, admitted))
        self.token_budget -= num_tokens


@dataclass
class _Built:
    """Records and their columns (:class:`StepColumns`) built so far by one ``schedule()``."""

    records: list[ScheduledRequest] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    start_pos: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)

    def add(self, record: ScheduledRequest) -> None:
        """Append one record and its columns (the general path; the fast loop appends inline)."""
        if record.read_whole:
            self.changed.append(len(self.records))
        self.records.append(record)
        self.req_ids.append(record.req_id)
        self.num_tokens.append(len(record.token_ids))
        self.start_pos.append(record.start_pos)
        self.token_ids.extend(record.token_ids)
        self.sample.append(record.sample)

    def columns(self) -> StepColumns:
        """The columns (no record of a ``_Built`` has drafts: the fast path runs without a proposer)."""
        return StepColumns(
            tuple(self.req_ids), tuple(self.num_tokens), tuple(self.start_pos), tuple(self.token_ids),
            tuple(self.sample), (0,) * len(self.records), tuple(self.changed),
        )


_ONE_PLACEHOLDER = (PLACEHOLDER_TOKEN_ID,)


def _for_known_general(
    req_id: str, token_ids: tuple[int, ...], start_pos: int, block_ids: tuple[int, ...], sample: bool,
    num_draft_tokens: int,
) -> ScheduledRequest:
    """``ScheduledRequest.for_known`` through the dataclass constructor (the general path)."""
    return ScheduledRequest(
        req_id, token_ids, start_pos, block_ids, sample, num_draft_tokens=num_draft_tokens
    )


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption by recompute.

    The ``policy`` (:mod:`~gpu_worker.core.scheduling_policy`; default FCFS) ranks requests.
    Running requests are served first, in (rank, admission) order; then waiting ones: preempted
    requests first (best rank, then most recently preempted first) unless a new one ranks
    strictly better, then new ones ordered by ``(rank, arrival_time)`` (FCFS among equals).
    Under KV pressure the last running request in (rank, admission) order is preempted. A
    waiting request for which ``ready(request)`` is False (its grammar is still compiling) is
    passed over without holding up the others. A request is always scheduled in the step that
    admits it, so "admitted this step" is exactly "new to the runner". Not thread-safe: the
    engine core loop is its only caller.
    """

    # False: the general path everywhere (tests prove the fast paths give the same outputs and
    # states, on a subclass that turns them off): records built by their dataclass constructors,
    # and a sampled token without drafts appended by ``_append_tokens``.
    _FAST_PATHS = True

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        block_size: int,
        hash_seed: str,
        policy: SchedulingPolicy | None = None,
        ready: Callable[[Request], bool] | None = None,
        overlap: bool = True,
        proposer: DraftSource | None = None,
    ) -> None:
        if block_size != kv.block_size:
            raise ValueError(f"block_size {block_size} differs from the KV cache's {kv.block_size}")
        if max_model_len > kv.num_blocks * block_size:
            # Guarantees a lone request always fits, so preemption always makes progress.
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the KV pool capacity {kv.num_blocks * block_size}"
            )
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0 or max_model_len <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be positive")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.hash_seed = hash_seed
        # False (pipeline parallel): a request with a step in flight is not planned again until
        # that step is accounted for, so several steps (micro-batches) in flight never share one.
        self.overlap = overlap
        self._requests: dict[str, Request] = {}  # every live (unfinished) request
        self.policy = policy if policy is not None else FCFSPolicy()
        self._ready = ready
        self._drafts = DraftPlanner(proposer) if proposer is not None else None
        self._running: list[Request] = []  # sorted by (rank, admission)
        self._preempted: list[Request] = []  # served before _waiting; sorted by (rank, -preemption)
        self._waiting: list[tuple[tuple[object, float, int], Request]] = []  # sorted by key
        self._num_waiting_tokens = 0  # tokens of the requests in _waiting
        self._arrivals = itertools.count()  # tie-breaker: FCFS among equal (rank, arrival)
        self._admissions = itertools.count()  # admission / preemption order
        self._finished_ids: set[str] = set()  # since the last schedule()
        self._preempted_ids: set[str] = set()  # since the last schedule()
        self._num_preemptions = 0
        self._device_seconds = 0.0  # step time attributed to requests, cumulative
        # Live requests whose prompt logprobs have not gone out yet: while there are any, steps
        # take ``update``'s general loop (the one that attaches them).
        self._unsent_prompt_logprobs: set[str] = set()

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, core_request: EngineCoreRequest) -> None:
        """Queue a request; ``ValueError`` names the problem if it can never be served."""
        rid = core_request.request_id
        num_tokens = len(core_request.prompt_token_ids) + len(core_request.output_token_ids)
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        if num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_tokens} tokens; it must be shorter than "
                f"max_model_len ({self.max_model_len})"
            )
        # Without prefix caching no block hash is ever read: the request gets none (Request).
        # An adapter's requests hash from its name: its blocks never serve the base model's, nor
        # another adapter's, prefix (the router hashes with the requested name too).
        seed = (core_request.lora_name or self.hash_seed) if self.kv.enable_caching else None
        request = Request.from_core_request(core_request, self.block_size, seed)
        self._requests[rid] = request
        if request.prompt_logprobs is not None:
            self._unsent_prompt_logprobs.add(rid)
        self._num_waiting_tokens += request.num_tokens
        request.rank = self.policy.rank(request)
        key = (request.rank, request.arrival_time, next(self._arrivals))
        bisect.insort(self._waiting, (key, request), key=lambda item: item[0])

    def live_lora_names(self) -> set[str]:
        """The LoRA adapters live requests run with (a slot is freed only when none does)."""
        return {r.lora_name for r in self._requests.values() if r.lora_name}

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """Finish live requests with ABORT and free their blocks; unknown ids are ignored.

        Waiting requests leave the queue in one pass, whatever their number: aborting k of n
        waiting requests costs O(n + k), not O(n * k) (a cancelled ``n=10000`` request frees
        its queue at once)."""
        outputs = []
        gone: set[int] = set()  # id() of the waiting requests to drop from _waiting
        for rid in request_ids:
            request = self._requests.get(rid)
            if request is None:
                continue
            if request.status is RequestStatus.WAITING:
                gone.add(id(request))
                self._num_waiting_tokens -= request.num_tokens
            else:
                self._dequeue(request)
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            outputs.append(
                EngineCoreOutput(
                    rid, (), finish_reason=FinishReason.ABORT, num_cached_tokens=request.num_cached_tokens,
                    device_s=request.unreported_device_s,
                )
            )
        if gone:
            self._waiting = [item for item in self._waiting if id(item[1]) not in gone]
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """The live request with this id (read-only use: the scheduler owns it)."""
        return self._requests.get(request_id)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Plan one step: running requests first, then admit waiting ones within the budgets."""
        plan = _StepPlan(token_budget=self.max_num_batched_tokens)
        built = None
        if self._drafts is not None:
            self._drafts.plan(self._running, self.max_model_len)
        if self._FAST_PATHS and self._drafts is None:
            built = self._schedule_running_fast(plan)
        else:
            self._schedule_running(plan)
        if not plan.preempted:
            self._schedule_waiting(plan)
        return self._build_output(plan, built)

    def _schedule_running(self, plan: _StepPlan) -> None:
        running, allocate, num_schedulable = self._running, self.kv.allocate, self._num_schedulable
        i = 0
        while i < len(running) and plan.token_budget > 0:
            request = running[i]
            num_tokens = num_schedulable(request)
            if num_tokens > plan.token_budget:
                num_tokens = plan.token_budget
            if num_tokens <= 0:  # nothing to compute until the step in flight is accounted for
                i += 1
                continue
            if request.spec_token_ids:
                del request.spec_token_ids[max(num_tokens - 1, 0) :]  # the budget cuts drafts first
            new_block_ids = allocate(request, num_tokens)
            while new_block_ids is None:
                # The last in (rank, admission) order is always at index >= i, so it was not
                # scheduled earlier in this step.
                victim = running.pop()
                self._preempt(victim)
                plan.preempted = True
                if victim is request:
                    return
                new_block_ids = allocate(request, num_tokens)
            plan.add(request, num_tokens, new_block_ids, admitted=False)
            i += 1

    def _schedule_running_fast(self, plan: _StepPlan) -> _Built:
        """``_schedule_running`` and ``_build_output``'s work for the running requests, in one
        pass that writes their records and columns (no proposer: no request has drafts).

        The same decisions as the two general methods, inlined (``_num_schedulable``, the token
        slice, the in-flight counters), because this loop runs for every running request every
        step. Building a request's record as soon as it is planned is the same as building it
        after the whole plan: nothing later in ``schedule()`` changes a planned running request
        (preemption takes victims from the end of ``_running``, which are not planned yet, and
        admissions touch waiting requests only)."""
        built = _Built()
        records, req_ids, num_tokens_col = built.records, built.req_ids, built.num_tokens
        starts, tokens, samples, changed = built.start_pos, built.token_ids, built.sample, built.changed
        running, allocate, tables = self._running, self.kv.allocate, self.kv.tables
        overlap, max_model_len, block_size = self.overlap, self.max_model_len, self.block_size
        # ``ScheduledRequest.for_known``, inlined: a copy of its template with five fields set
        # becomes the record's ``__dict__`` (``_fast_record``). The lockstep test of the fast
        # paths holds these records, ``vars()`` included, to the constructor's.
        template, new_record, set_dict = ScheduledRequest.field_defaults(), object.__new__, object.__setattr__
        budget = plan.token_budget
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            all_token_ids = request.all_token_ids
            num_known = len(all_token_ids)
            pending = request.num_pending_outputs
            inflight = request.num_inflight_tokens
            if pending:  # _num_schedulable: may a placeholder follow the token in flight?
                params = request.params
                max_tokens = params.max_tokens
                if (
                    not overlap
                    or params.structured_output is not None
                    or (max_tokens is not None and len(request.output_token_ids) + pending >= max_tokens)
                    or num_known + pending >= max_model_len
                ):
                    i += 1
                    continue
            elif inflight and not overlap:
                i += 1
                continue
            start = request.num_computed_tokens + inflight
            num_tokens = num_known + pending - start
            if num_tokens > budget:
                num_tokens = budget
            if num_tokens <= 0:  # nothing to compute until the step in flight is accounted for
                i += 1
                continue
            req_id = request.request_id
            table = tables.get(req_id)
            if table is not None and start + num_tokens <= len(table) * block_size:
                block_ids: tuple[int, ...] = ()  # ``allocate``'s opening test, inlined: the table has room
            else:
                new_block_ids = allocate(request, num_tokens)
                while new_block_ids is None:
                    victim = running.pop()  # the last in (rank, admission) order: not planned yet
                    self._preempt(victim)
                    plan.preempted = True
                    if victim is request:
                        plan.token_budget = budget
                        return built
                    new_block_ids = allocate(request, num_tokens)
                block_ids = tuple(new_block_ids)
                if block_ids:  # ScheduledRequest.read_whole, for a running (never new) request
                    changed.append(len(records))
            budget -= num_tokens
            end = start + num_tokens
            if end > num_known:  # the token the step in flight samples (at most one)
                if start >= num_known:
                    token_ids = _ONE_PLACEHOLDER if num_tokens == 1 else _ONE_PLACEHOLDER * num_tokens
                else:
                    token_ids = tuple(all_token_ids[start:]) + _ONE_PLACEHOLDER * (end - num_known)
            elif num_tokens == 1:  # a decode
                token_ids = (all_token_ids[start],)
            else:
                token_ids = tuple(all_token_ids[start:end])
            sample = end == num_known + pending
            request.num_inflight_tokens = inflight + num_tokens
            if sample:
                request.num_pending_outputs = pending + 1
            values = template.copy()
            values["req_id"] = req_id
            values["token_ids"] = token_ids
            values["start_pos"] = start
            values["block_ids"] = block_ids
            values["sample"] = sample
            record = new_record(ScheduledRequest)
            set_dict(record, "__dict__", values)
            records.append(record)
            req_ids.append(req_id)
            num_tokens_col.append(num_tokens)
            starts.append(start)
            tokens += token_ids
            samples.append(sample)
            i += 1
        plan.token_budget = budget
        return built

    def _num_schedulable(self, request: Request) -> int:
        """Tokens a running request can compute now: its tokens not scheduled yet, plus the
        one the step in flight samples for it unless that one ends it by length anyway."""
        pending = request.num_pending_outputs
        num_tokens = len(request.all_token_ids)
        if pending:
            if not self.overlap:
                return 0  # pipeline micro-batches: a request is in at most one step in flight
            params = request.params
            if params.structured_output is not None or self._drafts is not None:
                return 0  # its grammar mask / its drafts need the pending token(s): no placeholder
            max_tokens = params.max_tokens
            if (max_tokens is not None and len(request.output_token_ids) + pending >= max_tokens) or (
                num_tokens + pending >= self.max_model_len
            ):
                return 0
        elif request.num_inflight_tokens and not self.overlap:
            return 0
        return (
            num_tokens + pending - request.num_computed_tokens - request.num_inflight_tokens
            + len(request.spec_token_ids)
        )

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        while plan.token_budget > 0 and len(self._running) < self.max_num_seqs:
            request, index = self._peek_waiting()
            if request is None or request.num_pending_outputs:
                # A request preempted while a step in flight samples for it resumes once that
                # token is known (the next update); nobody overtakes the head of the queue.
                return
            # A request still gathering prompt logprobs computes every prompt position.
            cached_ids, num_cached = (
                ([], 0) if request.needs_prompt_logprobs else self.kv.match_prefix(request)
            )
            num_tokens = min(request.num_tokens - num_cached, plan.token_budget)
            new_block_ids = self.kv.allocate(request, num_tokens, cached_ids)
            if new_block_ids is None:
                return  # the head of the queue waits for blocks; nobody overtakes it
            self._pop_waiting(request, index)
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            request.order = next(self._admissions)
            bisect.insort(self._running, request, key=lambda r: (r.rank, r.order))
            plan.add(request, num_tokens, new_block_ids, admitted=True)

    def _peek_waiting(self) -> tuple[Request | None, int]:
        """The next request to admit and its index in ``_waiting`` (-1: the preempted head).

        The first waiting request that is ready (its grammar compiled) competes with the
        preempted head, which wins ties (module docstring of ``scheduling_policy``)."""
        index, ready = 0, self._ready
        if ready is not None:
            while index < len(self._waiting) and not ready(self._waiting[index][1]):
                index += 1
        waiting = self._waiting[index][1] if index < len(self._waiting) else None
        if self._preempted and (waiting is None or not waiting.rank < self._preempted[0].rank):
            return self._preempted[0], -1
        return waiting, index

    def _pop_waiting(self, request: Request, index: int) -> None:
        if index < 0:
            del self._preempted[0]
        else:
            del self._waiting[index]
            self._num_waiting_tokens -= request.num_tokens

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_inflight_tokens = 0  # recomputed on resume; a pending output still comes
        request.spec_token_ids = []
        request.order = -next(self._admissions)  # most recently preempted first among equal ranks
        bisect.insort(self._preempted, request, key=lambda r: (r.rank, r.order))
        self._preempted_ids.add(request.request_id)
        self._num_preemptions += 1

    def _build_output(self, plan: _StepPlan, built: _Built | None = None) -> SchedulerOutput:
        """The step's records: those ``built`` already (the fast path's running requests, with
        their columns), then one per entry of ``plan``."""
        scheduled: list[ScheduledRequest] = built.records if built is not None else []
        append = scheduled.append if built is None else built.add
        for_known = ScheduledRequest.for_known if self._FAST_PATHS else _for_known_general
        for request, num_tokens, new_block_ids, admitted in plan.entries:
            drafts = request.spec_token_ids
            if drafts:
                request.spec_token_ids = []
            all_token_ids = request.all_token_ids
            num_known = len(all_token_ids)
            start = request.num_computed_tokens + request.num_inflight_tokens
            end = start + num_tokens - len(drafts)
            if end > num_known:  # the token the step in flight samples (at most one)
                if start >= num_known:  # a decode of that token alone
                    token_ids = (PLACEHOLDER_TOKEN_ID,) * (end - start)
                else:
                    token_ids = tuple(all_token_ids[start:]) + (PLACEHOLDER_TOKEN_ID,) * (end - num_known)
            elif end == start + 1:  # a decode
                token_ids = (all_token_ids[start],)
            else:
                token_ids = tuple(all_token_ids[start:end])
            if drafts:
                token_ids += tuple(drafts)
            sample = end == num_known + request.num_pending_outputs
            request.num_inflight_tokens += num_tokens
            if sample:
                request.num_pending_outputs += 1
            if admitted:  # new to the runner (first admission or resumed): send everything
                entry = ScheduledRequest(
                    request.request_id,
                    token_ids,
                    start,
                    tuple(self.kv.block_ids(request)),
                    sample,
                    is_new=True,
                    params=request.params,
                    prompt_len=request.num_prompt_tokens,
                    output_token_ids=tuple(request.output_token_ids),
                    prompt_token_ids=tuple(request.prompt_token_ids),
                    lora_name=request.lora_name,
                    images=request.images,
                )
            else:
                entry = for_known(
                    request.request_id, token_ids, start, tuple(new_block_ids) if new_block_ids else (),
                    sample, len(drafts),
                )
            append(entry)
        output = SchedulerOutput(
            requests=tuple(scheduled),
            num_scheduled_tokens=self.max_num_batched_tokens - plan.token_budget,
            finished_req_ids=frozenset(self._finished_ids),
            preempted_req_ids=frozenset(self._preempted_ids),
            columns=built.columns() if built is not None else None,
        )
        self._finished_ids.clear()
        self._preempted_ids.clear()
        return output

    # ------------------------------------------------------------------ update

    def update(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput, device_s: float = 0.0
    ) -> list[EngineCoreOutput]:
        """Account for a computed step: advance, cache full blocks, append samples, stop checks;
        ``device_s`` (the step's device time) is split over its requests by tokens."""
        if (self._FAST_PATHS and not runner_output.accepted_draft_ids and not self._unsent_prompt_logprobs
                and not runner_output.pooled):
            cols = scheduler_output.step_columns()
            if (
                not any(cols.num_draft_tokens)
                and len(runner_output.sampled_token_ids) == len(runner_output.req_ids)
                and runner_output.req_ids == tuple(itertools.compress(cols.req_ids, cols.sample))
            ):
                return self._update_columns(scheduler_output, cols, runner_output, device_s)
        sampled = dict(zip(runner_output.req_ids, runner_output.sampled_token_ids, strict=True))
        logprobs: dict[str, TokenLogprobs | None] = dict(
            zip(runner_output.req_ids, runner_output.logprobs, strict=False)
        )
        missing = [e.req_id for e in scheduler_output.requests if e.sample and e.req_id not in sampled]
        if missing:  # checked before any state changes
            raise ValueError(f"runner output has no sampled token for requests {missing}")
        accepted = self._accepted_drafts(scheduler_output, runner_output)
        pooled = dict(zip(runner_output.req_ids, runner_output.pooled, strict=False))
        for prompt in runner_output.prompt_logprobs:  # before the outputs that may carry them
            prompt_request = self._requests.get(prompt.req_id)
            if prompt_request is not None:
                prompt_request.add_prompt_logprobs(prompt.first, prompt.logprobs)
        outputs: list[EngineCoreOutput] = []
        append, requests, commit_computed = outputs.append, self._requests, self.kv.commit_computed
        running, fast_paths = RequestStatus.RUNNING, self._FAST_PATHS
        make_output = EngineCoreOutput.fast if fast_paths else EngineCoreOutput
        num_tokens = scheduler_output.num_scheduled_tokens
        per_token_s = device_s / num_tokens if num_tokens else 0.0
        for entry in scheduler_output.requests:
            req_id = entry.req_id
            request = requests.get(req_id)
            if request is None:
                continue  # finished or aborted between schedule() and update(): its share is dropped
            num_entry_tokens = len(entry.token_ids)
            num_drafts = entry.num_draft_tokens
            if per_token_s:
                share = per_token_s * num_entry_tokens
                request.unreported_device_s += share
                self._device_seconds += share
            if request.status is running:
                request.num_inflight_tokens -= num_entry_tokens
                # Rejected drafts' K/V are not computed tokens: later tokens overwrite their slots.
                # An entry without drafts has none accepted (``_accepted_drafts`` checked it).
                request.num_computed_tokens += num_entry_tokens - num_drafts
                if num_drafts:
                    request.num_computed_tokens += len(accepted.get(req_id, ((), ()))[0])
                commit_computed(request)
            # Otherwise it was preempted after this step was planned (async scheduling): its
            # K/V are recomputed on resume, but the token sampled for it is as good as any.
            if not entry.sample:
                continue
            request.num_pending_outputs -= 1
            # Taken before the stop checks, which may finish the request (max_tokens 1).
            prompt_logprobs = self._take_prompt_logprobs(request)
            token_logprobs = logprobs.get(req_id) if logprobs else None
            if not num_drafts and fast_paths:
                # One sampled token and no drafts: ``_append_tokens`` for one token, inlined.
                token_id = sampled[req_id]
                request.append_output_token(token_id)
                finish_reason = self._check_stop(request, token_id)
                new_ids: tuple[int, ...] = (token_id,)
                new_logprobs: tuple[TokenLogprobs, ...] = () if token_logprobs is None else (token_logprobs,)
            else:
                draft_ids, draft_logprobs = accepted.get(req_id, ((), ()))
                if num_drafts and self._drafts is not None:
                    self._drafts.record(num_drafts, len(draft_ids))
                new_ids, new_logprobs, finish_reason = self._append_tokens(
                    request, (*draft_ids, sampled[req_id]),
                    (*draft_logprobs, token_logprobs) if token_logprobs is not None else (),
                )
            append(
                make_output(
                    req_id, new_ids, new_logprobs, finish_reason, request.num_cached_tokens,
                    request.stop_token_id, request.unreported_device_s,
                    prompt_logprobs=prompt_logprobs, embedding=pooled.get(req_id),
                )
            )
            request.unreported_device_s = 0.0
        return outputs

    def _update_columns(
        self, scheduler_output: SchedulerOutput, cols: StepColumns, runner_output: RunnerOutput,
        device_s: float,
    ) -> list[EngineCoreOutput]:
        """``update`` for a step without drafts whose sampled tokens come in the plan's order (as
        the runner returns them): the same state changes and outputs, read from the plan's
        columns, one sampled token per sampled request.

        The common case of the per-request calls is inlined, as this loop runs for every running
        request every step: ``commit_computed`` is called only when its opening test finds a
        block that became full, ``append_output_token`` appends here and calls
        ``hash_full_blocks`` only when a block became full, and ``_check_stop`` is called only
        when the token can end the request (a stop id, or a length reached)."""
        outputs: list[EngineCoreOutput] = []
        append, requests, commit_computed = outputs.append, self._requests, self.kv.commit_computed
        running, check_stop = RequestStatus.RUNNING, self._check_stop
        # Every request's block size is the scheduler's (``add_request``).
        block_size, max_model_len = self.block_size, self.max_model_len
        # Without prefix caching nothing is ever committed (no block hashes): skip the check.
        num_committed: Mapping[str, int] = self.kv.num_committed if self.kv.enable_caching else {}
        new_record, set_dict = object.__new__, object.__setattr__
        num_tokens = scheduler_output.num_scheduled_tokens
        per_token_s = device_s / num_tokens if num_tokens else 0.0
        device_seconds = self._device_seconds
        sampled = iter(runner_output.sampled_token_ids)
        logprobs = iter(runner_output.logprobs)  # may be shorter (empty): None past its end
        token_id = 0
        token_logprobs: TokenLogprobs | None = None
        for req_id, num_entry_tokens, sample in zip(cols.req_ids, cols.num_tokens, cols.sample, strict=True):
            if sample:
                token_id = next(sampled)
                token_logprobs = next(logprobs, None)
            request = requests.get(req_id)
            if request is None:
                continue  # finished or aborted between schedule() and update(): its share is dropped
            if per_token_s:
                share = per_token_s * num_entry_tokens
                request.unreported_device_s += share
                device_seconds += share
            if request.status is running:
                request.num_inflight_tokens -= num_entry_tokens
                num_computed = request.num_computed_tokens + num_entry_tokens
                request.num_computed_tokens = num_computed
                done = num_committed.get(req_id)  # None: no block table, nothing to commit
                if done is not None and num_computed // block_size > done:
                    commit_computed(request)
            if not sample:
                continue
            request.num_pending_outputs -= 1
            output_token_ids = request.output_token_ids
            all_token_ids = request.all_token_ids
            output_token_ids.append(token_id)
            all_token_ids.append(token_id)
            num_known = len(all_token_ids)
            if num_known % block_size == 0:
                request.hash_full_blocks()
            max_tokens = request.params.max_tokens
            if (
                token_id in request.stop_ids
                or num_known >= max_model_len
                or (max_tokens is not None and len(output_token_ids) >= max_tokens)
            ):
                finish_reason = check_stop(request, token_id)
            else:
                finish_reason = None
            output = new_record(EngineCoreOutput)  # ``EngineCoreOutput.fast``, inlined
            set_dict(output, "__dict__", {
                "request_id": req_id,
                "new_token_ids": (token_id,),
                "new_logprobs": () if token_logprobs is None else (token_logprobs,),
                "finish_reason": finish_reason,
                "num_cached_tokens": request.num_cached_tokens,
                "stop_token_id": request.stop_token_id,
                "device_s": request.unreported_device_s,
                "prompt_logprobs": None,  # a step with prompt logprobs takes ``update``'s loop
                "embedding": None,  # so does a pooling step
            })
            append(output)
            request.unreported_device_s = 0.0
        self._device_seconds = device_seconds
        return outputs

    def _take_prompt_logprobs(self, request: Request) -> tuple[TokenLogprobs, ...] | None:
        """What the request's sampled output carries as prompt logprobs (once; None mostly)."""
        if request.request_id not in self._unsent_prompt_logprobs:
            return None
        self._unsent_prompt_logprobs.discard(request.request_id)
        return request.take_prompt_logprobs()

    @staticmethod
    def _accepted_drafts(
        sched: SchedulerOutput, out: RunnerOutput
    ) -> dict[str, tuple[tuple[int, ...], tuple[TokenLogprobs, ...]]]:
        """Per request, the drafts the runner accepted (a prefix of those scheduled, checked before
        any state changes) and their logprobs."""
        if not out.accepted_draft_ids:
            return {}
        lps = out.accepted_logprobs or ((),) * len(out.req_ids)
        accepted = dict(zip(out.req_ids, zip(out.accepted_draft_ids, lps, strict=True), strict=True))
        for entry in sched.requests:
            ids = accepted.get(entry.req_id, ((), ()))[0]
            drafts = entry.token_ids[len(entry.token_ids) - entry.num_draft_tokens :]
            if tuple(ids) != drafts[: len(ids)]:
                raise ValueError(f"runner accepted {ids} for {entry.req_id}: not a prefix of {drafts}")
        return accepted

    def _append_tokens(
        self, request: Request, token_ids: tuple[int, ...], token_logprobs: tuple[TokenLogprobs | None, ...]
    ) -> tuple[tuple[int, ...], tuple[TokenLogprobs, ...], FinishReason | None]:
        """Append a step's new tokens (accepted drafts, then the sampled one) up to the first that
        ends the request; returns those tokens, their logprobs and the finish reason."""
        finish_reason = None
        num = 0
        for token_id in token_ids:
            request.append_output_token(token_id)
            num += 1
            finish_reason = self._check_stop(request, token_id)
            if finish_reason is not None:
                break
        return token_ids[:num], tuple(lp for lp in token_logprobs[:num] if lp is not None), finish_reason

    def _check_stop(self, request: Request, token_id: int) -> FinishReason | None:
        """Finish the request if ``token_id`` ends it; returns the reason (None: keep going)."""
        params = request.params
        num_output_tokens = len(request.output_token_ids)
        # stop_ids: the EOS ids (unless ignore_eos) and the stop token ids.
        if token_id in request.stop_ids and num_output_tokens >= params.min_tokens:
            request.stop_token_id = token_id
            self._dequeue(request)
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            return FinishReason.STOP
        max_tokens = params.max_tokens
        if (max_tokens is not None and num_output_tokens >= max_tokens) or (
            len(request.all_token_ids) >= self.max_model_len
        ):
            self._dequeue(request)
            self._finish(request, RequestStatus.FINISHED_LENGTH)
            return FinishReason.LENGTH
        return None

    def _dequeue(self, request: Request) -> None:
        """Take a live request out of whichever queue holds it."""
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        elif request.status is RequestStatus.PREEMPTED:
            self._preempted.remove(request)
        else:
            self._waiting = [item for item in self._waiting if item[1] is not request]
            self._num_waiting_tokens -= request.num_tokens

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Free a request already taken out of its queue."""
        request.status = status
        self.kv.free(request)
        if self._drafts is not None:
            self._drafts.proposer.drop((request.request_id,))
        del self._requests[request.request_id]
        self._unsent_prompt_logprobs.discard(request.request_id)
        self._finished_ids.add(request.request_id)

    # ------------------------------------------------------------------ observability

    def stats(self) -> SchedulerStats:
        """Point-in-time load and cumulative counters."""
        prefix = self.kv.stats
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting) + len(self._preempted),
            kv_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_blocks,
            spec_decode=self._drafts.stats() if self._drafts is not None else None,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_preemptions=self._num_preemptions,
            num_waiting_tokens=self._num_waiting_tokens,
            device_seconds=self._device_seconds,
        )

    def take_kv_events(self) -> list[KVEvent]:
        """Drain the KV cache's stored/removed events since the last call."""
        return self.kv.take_events()

    def cached_block_hashes(self) -> set[bytes]:
        """Snapshot of every cached block hash (for a full resync of the router's index)."""
        return self.kv.cached_block_hashes()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; False (nothing done) while requests hold blocks."""
        return self.kv.reset_prefix_cache()
