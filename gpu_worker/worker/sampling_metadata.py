"""Builds the sampler's :class:`SamplingMetadata` for the sampled rows of a step."""

from __future__ import annotations

import numpy as np
import torch

from gpu_worker.worker.request_state import UNKNOWN_TOKEN, RequestStates, seed_for_draw
from gpu_worker.worker.sampler import PenaltyInputs, SamplingMetadata


def build_sampling_metadata(
    states: RequestStates,
    rows: np.ndarray,
    vocab_size: int,
    device: torch.device,
    num_tokens: np.ndarray | None = None,
) -> SamplingMetadata:
    """Gather the per-row settings of ``rows`` (in order) into device tensors.

    Optional parts (top-k, top-p, min-p, penalties, bias, min_tokens, logprobs, seeds) are
    built only when some row uses them, so the common case stays a few small copies.
    ``num_tokens`` (speculative decoding, where a state row appears once per verified position):
    the tokens before the one each row samples; default: all the row's known tokens.
    """
    greedy = states.greedy[rows]
    all_greedy = bool(greedy.all())
    n_tok = states.num_tokens[rows] if num_tokens is None else num_tokens
    num_outputs = n_tok - states.prompt_len[rows]  # index of the token sampled now

    def dev(a: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(a))
        if device.type == "cuda":
            # From pageable memory the copy may wait for the stream; pinned, it is queued
            # behind the step in flight (async scheduling), and the caching host allocator
            # keeps the buffer until the copy has run.
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    temperature = top_k = top_p = min_p = greedy_mask = None
    seeded: tuple[tuple[int, torch.Generator], ...] = ()
    if not all_greedy:
        temperature = dev(states.temperature[rows])
        greedy_mask = dev(greedy) if greedy.any() else None
        k = states.top_k[rows]
        top_k = dev(np.where(k > 0, k, vocab_size)) if np.any(k > 0) else None
        p = states.top_p[rows]
        top_p = dev(p) if np.any(p < 1.0) else None
        m = states.min_p[rows]
        min_p = dev(m) if np.any(m > 0.0) else None
        seeded = _seeded_generators(states, rows, num_outputs)
    logprobs = states.num_logprobs[rows]
    return SamplingMetadata(
        all_greedy=all_greedy,
        greedy_mask=greedy_mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seeded=seeded,
        penalties=_penalties(states, rows, n_tok, vocab_size, device)
        if states.needs_penalties[rows].any()
        else None,
        logit_bias=_logit_bias(states, rows, device),
        banned=_banned(states, rows, n_tok, num_outputs, device),
        allowed=_allowed(states, rows, vocab_size, device),
        num_logprobs=tuple(int(n) if n >= 0 else None for n in logprobs) if np.any(logprobs >= 0) else None,
    )


def _seeded_generators(
    states: RequestStates, rows: np.ndarray, num_outputs: np.ndarray
) -> tuple[tuple[int, torch.Generator], ...]:
    out = []
    for i in np.flatnonzero(states.seeded[rows]):
        rs = states.sampling[rows[i]]
        assert rs is not None and rs.generator is not None and rs.params.seed is not None
        rs.generator.manual_seed(seed_for_draw(rs.params.seed, int(num_outputs[i])))
        out.append((int(i), rs.generator))
    return tuple(out)


def _penalties(
    states: RequestStates, rows: np.ndarray, n_tok: np.ndarray, vocab_size: int, device: torch.device
) -> PenaltyInputs:
    length = int(n_tok.max())
    tokens = states.token_ids[rows, :length]
    pos = np.arange(length)[None, :]
    valid = (pos < n_tok[:, None]) & (tokens != UNKNOWN_TOKEN)
    is_output = pos >= states.prompt_len[rows][:, None]
    # Out-of-scope entries go to an extra bin (index vocab_size) that is dropped afterwards.
    out_idx = torch.from_numpy(np.where(valid & is_output, tokens, vocab_size)).to(device)
    prompt_idx = torch.from_numpy(np.where(valid & ~is_output, tokens, vocab_size)).to(device)
    num_rows = len(rows)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, out_idx, torch.ones_like(out_idx, dtype=torch.float32))
    prompt_mask = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=device)
    prompt_mask.scatter_(1, prompt_idx, True)

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return PenaltyInputs(
        presence=dev(states.presence[rows]),
        frequency=dev(states.frequency[rows]),
        repetition=dev(states.repetition[rows]),
        output_counts=counts[:, :vocab_size],
        prompt_mask=prompt_mask[:, :vocab_size],
    )


def _logit_bias(
    states: RequestStates, rows: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    which = np.flatnonzero(states.has_bias[rows])
    if not len(which):
        return None
    parts = [states.sampling[rows[i]] for i in which]
    ids = np.concatenate([p.bias_ids for p in parts if p is not None])
    values = np.concatenate([p.bias_values for p in parts if p is not None])
    row_ids = np.repeat(which, [len(p.bias_ids) for p in parts if p is not None])
    return (
        torch.from_numpy(row_ids).to(device),
        torch.from_numpy(ids).to(device),
        torch.from_numpy(values).to(device),
    )


def _banned(
    states: RequestStates, rows: np.ndarray, n_tok: np.ndarray, num_outputs: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """EOS and stop ids of rows still short of ``min_tokens``, and the bad words' last tokens
    where the output so far (its ``num_outputs`` tokens before ``n_tok``) ends with the rest."""
    which = np.flatnonzero(num_outputs < states.min_tokens[rows])
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i in which.tolist():
        rs = states.sampling[rows[i]]
        if rs is not None and rs.stop_ids:
            row_ids.extend([int(i)] * len(rs.stop_ids))
            token_ids.extend(rs.stop_ids)
    for i in np.flatnonzero(states.has_bad_words[rows]).tolist():
        rs = states.sampling[rows[i]]
        assert rs is not None  # invariant: a live row has its sampling settings
        end = int(n_tok[i])
        k = min(max(len(ids) for ids in rs.bad_words) - 1, int(num_outputs[i]))  # output tokens only
        recent = tuple(states.token_ids[rows[i], end - k : end].tolist()) if k > 0 else ()
        for ids in rs.bad_words:
            prefix = ids[:-1]
            if not prefix or (len(prefix) <= len(recent) and recent[len(recent) - len(prefix):] == prefix):
                row_ids.append(i)
                token_ids.append(ids[-1])
    if not row_ids:
        return None
    return (
        torch.tensor(row_ids, dtype=torch.int64, device=device),
        torch.tensor(token_ids, dtype=torch.int64, device=device),
    )


def _allowed(
    states: RequestStates, rows: np.ndarray, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows with ``allowed_token_ids`` and their masks (True: samplable)."""
    which = np.flatnonzero(states.has_allowed[rows])
    if not len(which):
        return None
    mask = np.zeros((len(which), vocab_size), dtype=bool)
    for k, i in enumerate(which.tolist()):
        rs = states.sampling[rows[i]]
        assert rs is not None and rs.allowed_ids is not None  # invariant: has_allowed rows have them
        mask[k, rs.allowed_ids] = True
    return torch.from_numpy(which).to(device), torch.from_numpy(mask).to(device)
