"""Prompt logprobs (``SamplingParams.prompt_logprobs``): which token rows of a step need them,
and computing them from the step's hidden states.

A request that asked for them has, at every prompt position ``p < prompt_len - 1`` the step
computes, the logprob of the prompt token at ``p + 1`` (its *target*) under the model's raw
distribution, with its rank and the top-N, as the sampled tokens' logprobs are (``gather_logprobs``).
The prompt's last position is the one the first output token is sampled from: not a prompt
position here. Targets come from the runner's token history, which holds the whole prompt
from the request's admission (``ScheduledRequest.prompt_token_ids``), so a chunk's last
position finds its target although the next chunk brings it.

The LM head runs over those rows in slices of at most :data:`SLICE_ELEMENTS` logits, so a long
prefill chunk does not allocate ``[chunk, vocab]`` float32 logits at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpu_worker.core.types import PromptLogprobs, StepColumns, TokenLogprobs
from gpu_worker.worker.request_state import RequestStates
from gpu_worker.worker.sampler import LogprobsTensors, gather_logprobs

SLICE_ELEMENTS = 1 << 25  # logits per LM-head slice: 128 MiB of float32


@dataclass(frozen=True)
class PromptLogprobsPlan:
    """The step's prompt positions that need logprobs, request by request (in step order)."""

    req_ids: tuple[str, ...]
    firsts: tuple[int, ...]  # per request: the prompt position of its first target
    counts: tuple[int, ...]  # per request: its number of positions in the step
    token_rows: np.ndarray  # int64 [R]: the positions' rows in the step's flat token batch
    targets: np.ndarray  # int64 [R]: the token each position's logprob is for
    top_n: tuple[int, ...]  # per row (R): the alternatives its request asked for


def plan_prompt_logprobs(
    states: RequestStates, rows: np.ndarray, columns: StepColumns
) -> PromptLogprobsPlan | None:
    """The step's rows that need prompt logprobs (None: none do). ``rows``: the step's
    requests' state rows, in ``columns`` order."""
    wanted = np.flatnonzero(states.num_prompt_logprobs[rows] >= 0)
    if not wanted.size:
        return None
    q_lens = np.asarray(columns.num_tokens, dtype=np.int64)
    token_starts = np.cumsum(q_lens) - q_lens
    req_ids, firsts, counts, token_rows, targets, top_n = [], [], [], [], [], []
    for i in wanted.tolist():
        row = int(rows[i])
        start = columns.start_pos[i]
        end = min(start + int(q_lens[i]), int(states.prompt_len[row]) - 1)  # positions start .. end - 1
        if end <= start:
            continue
        n = end - start
        req_ids.append(columns.req_ids[i])
        firsts.append(start + 1)
        counts.append(n)
        token_rows.append(np.arange(n, dtype=np.int64) + token_starts[i])
        targets.append(states.token_ids[row, start + 1 : end + 1])
        top_n.extend([int(states.num_prompt_logprobs[row])] * n)
    if not req_ids:
        return None
    all_targets = np.concatenate(targets)
    if np.any(all_targets < 0):  # an invariant: the prompt is recorded whole at admission
        raise RuntimeError("a prompt position's target token is unknown to the runner")
    return PromptLogprobsPlan(
        tuple(req_ids), tuple(firsts), tuple(counts), np.concatenate(token_rows), all_targets, tuple(top_n)
    )


class PendingPromptLogprobs:
    """A step's prompt logprobs on their way to the host (:meth:`result` once the copies are done)."""

    def __init__(
        self, plan: PromptLogprobsPlan, parts: list[LogprobsTensors], copied: torch.cuda.Event | None
    ) -> None:
        self._plan = plan
        self._parts = parts
        self._copied = copied

    def result(self) -> tuple[PromptLogprobs, ...]:
        """One :class:`PromptLogprobs` per request of the plan (waits for the device copies)."""
        if self._copied is not None:
            self._copied.synchronize()
        plan = self._plan
        flat: list[TokenLogprobs | None] = []
        start = 0
        for part in self._parts:
            n = len(part.num_logprobs)
            flat.extend(part.to_list(plan.targets[start : start + n].tolist()))
            start += n
        out = []
        offset = 0
        for req_id, first, count in zip(plan.req_ids, plan.firsts, plan.counts, strict=True):
            logprobs = tuple(lp for lp in flat[offset : offset + count] if lp is not None)
            out.append(PromptLogprobs(req_id, first, logprobs))
            offset += count
        return tuple(out)


def compute_prompt_logprobs(
    model: torch.nn.Module, hidden: torch.Tensor, plan: PromptLogprobsPlan, vocab_size: int
) -> PendingPromptLogprobs | None:
    """Run the LM head over the plan's rows of ``hidden`` (``[T, H]``, the step's last-stage
    hidden states) and start copying their logprobs to the host. Every tensor parallel rank
    calls this with the same plan (the LM head's gather is a collective); None on the ranks that
    do not sample."""
    device = hidden.device
    token_rows = torch.from_numpy(plan.token_rows).to(device)
    targets = torch.from_numpy(plan.targets).to(device)
    per_slice = max(1, SLICE_ELEMENTS // vocab_size)
    parts: list[LogprobsTensors] = []
    sampling_rank = True
    for start in range(0, len(plan.targets), per_slice):
        end = min(start + per_slice, len(plan.targets))
        logits = model.compute_logits(hidden.index_select(0, token_rows[start:end]))  # type: ignore[operator]
        if logits is None:  # another tensor parallel rank samples
            sampling_rank = False
            continue
        raw = logits.float().log_softmax(dim=-1)
        n_rows = tuple(plan.top_n[start:end])
        parts.append(gather_logprobs(raw, targets[start:end], n_rows).to_host())
    if not sampling_rank:
        return None
    copied = None
    if device.type == "cuda":
        copied = torch.cuda.Event()
        copied.record()
    return PendingPromptLogprobs(plan, parts, copied)
