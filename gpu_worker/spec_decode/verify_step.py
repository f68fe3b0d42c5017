"""The model runner's sampling for a step with drafts: sampling settings per verified position,
verification (:mod:`.rejection`), and the host side of its result."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gpu_worker.core.types import GrammarBitmask, RunnerOutput, TokenLogprobs
from gpu_worker.spec_decode.rejection import DraftLayout, verify
from gpu_worker.worker.logits_processing import LogitsProcessing
from gpu_worker.worker.request_state import RequestStates, seed_for_draw
from gpu_worker.worker.sampler import gather_logprobs
from gpu_worker.worker.sampling_metadata import build_sampling_metadata
from gpu_worker.worker.step_inputs import StepInputs


def seeded_draws(states: RequestStates, rows: np.ndarray, history: np.ndarray) -> list[tuple[int, int]]:
    """``(row, draw seed)`` of the seeded random rows: each row's draw is seeded by the output
    index of the token it samples, as plain decoding seeds it."""
    out = []
    for i in np.flatnonzero(states.seeded[rows]).tolist():
        row = int(rows[i])
        rs = states.sampling[row]
        assert rs is not None and rs.params.seed is not None
        out.append((i, seed_for_draw(rs.params.seed, int(history[i] - states.prompt_len[row]))))
    return out


def verify_drafts(
    logits: torch.Tensor,
    inputs: StepInputs,
    states: RequestStates,
    processing: LogitsProcessing,
    generator: torch.Generator,
    grammar: GrammarBitmask | None,
) -> tuple[torch.Tensor, Callable[[], RunnerOutput]]:
    """Verify the step's drafts; ``logits`` has one row per verified position (``inputs``'s
    logits indices). Returns the final token of each sampled request (on the device, for the
    other TP ranks and later placeholders) and a function that waits for the results, records
    them in ``states`` and builds the :class:`RunnerOutput`."""
    assert inputs.num_draft_tokens is not None and inputs.draft_token_ids is not None
    logits = logits.float()  # the model's dtype (ParallelLMHead.compute_logits): verify in float32
    layout = DraftLayout(inputs.num_draft_tokens, inputs.draft_token_ids)
    rows = inputs.sample_rows[layout.row_request]
    # Row j of a request samples the token at its j-th draft's position: that many tokens precede it.
    history = (inputs.sample_positions - layout.num_drafts)[layout.row_request] + layout.row_offset
    row_req_ids = tuple(inputs.sample_req_ids[i] for i in layout.row_request.tolist())
    md = build_sampling_metadata(states, rows, logits.shape[-1], logits.device, num_tokens=history)
    md = processing.attach(md, states, rows, row_req_ids, grammar)
    result = verify(logits, md, layout, generator, seeded_draws(states, rows, history))
    logprobs = None
    if md.num_logprobs is not None:  # of the raw distribution, as the sampler's
        logprobs = gather_logprobs(logits.log_softmax(dim=-1), result.row_tokens, md.num_logprobs).to_host()
    num_accepted_host = result.num_accepted.to("cpu", non_blocking=True)
    final_host = result.final_ids.to("cpu", non_blocking=True)
    row_tokens_host = result.row_tokens.to("cpu", non_blocking=True) if logprobs is not None else None
    copied = None
    if logits.device.type == "cuda":
        copied = torch.cuda.Event()
        copied.record()

    def finalize() -> RunnerOutput:
        if copied is not None:
            copied.synchronize()
        num_accepted = num_accepted_host.numpy()
        final_ids: list[int] = final_host.tolist()
        positions = inputs.sample_positions - layout.num_drafts + num_accepted
        states.record_verified(inputs.sample_rows, positions, final_ids, inputs.sample_req_ids)
        counts = num_accepted.tolist()
        accepted = tuple(tuple(layout.draft_ids[i, :a].tolist()) for i, a in enumerate(counts))
        final_lps: tuple[TokenLogprobs | None, ...] = ()
        accepted_lps: tuple[tuple[TokenLogprobs, ...], ...] = ()
        if logprobs is not None and row_tokens_host is not None:
            per_row = logprobs.to_list(row_tokens_host.tolist())
            starts = layout.first_row.tolist()
            final_lps = tuple(per_row[s + a] for s, a in zip(starts, counts, strict=True))
            accepted_lps = tuple(
                tuple(lp for lp in per_row[s : s + a] if lp is not None)
                for s, a in zip(starts, counts, strict=True)
            )
        return RunnerOutput(
            req_ids=inputs.sample_req_ids,
            sampled_token_ids=tuple(final_ids),
            logprobs=final_lps,
            accepted_draft_ids=accepted,
            accepted_logprobs=accepted_lps,
        )

    return result.final_ids, finalize
