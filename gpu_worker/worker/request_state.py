"""Persistent per-request state of the model runner, in preallocated row-indexed arrays.

Each live request owns one row (``0 .. max_num_seqs - 1``) of every array. The block table
row grows as the scheduler appends blocks; the token history (prompt + output, ``-1`` where
unknown, e.g. prefix-cached prompt tokens the runner never saw) feeds the penalties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpu_worker.core.types import ScheduledRequest, StepColumns
from gpu_worker.sampling_params import SamplingParams

UNKNOWN_TOKEN = -1


@dataclass(frozen=True)
class RowSampling:
    """Sampling inputs of one row that are fixed for the request's lifetime."""

    params: SamplingParams
    stop_ids: tuple[int, ...]  # masked while fewer than min_tokens outputs
    bias_ids: np.ndarray  # int64
    bias_values: np.ndarray  # float32
    generator: torch.Generator | None  # seeded requests only
    allowed_ids: np.ndarray | None = None  # int64: the only samplable tokens (None: all)
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences whose last token is masked


def seed_for_draw(seed: int, output_index: int) -> int:
    """A 63-bit seed per (request seed, output index): draws independent of batch and path."""
    x = (seed * 0x9E3779B97F4A7C15 + (output_index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class RequestStates:
    """Rows of live requests: block tables, token history, sampling settings."""

    def __init__(
        self,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        eos_token_ids: Sequence[int],
        device: torch.device,
    ) -> None:
        pin = device.type == "cuda"
        self.device = device
        self.eos_token_ids = tuple(eos_token_ids)
        # int32 [max_num_seqs, max_blocks_per_seq]; pinned on CUDA so slices copy asynchronously.
        self.block_table = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self.block_table_np = self.block_table.numpy()
        self.num_blocks = np.zeros(max_num_seqs, dtype=np.int64)
        self.token_ids = np.full((max_num_seqs, max_model_len + 1), UNKNOWN_TOKEN, dtype=np.int64)
        self.num_tokens = np.zeros(max_num_seqs, dtype=np.int64)  # tokens whose position is known
        self.prompt_len = np.zeros(max_num_seqs, dtype=np.int64)
        self.sampling: list[RowSampling | None] = [None] * max_num_seqs
        # Per-row sampling settings as arrays, so a step gathers them with one fancy index.
        self.temperature = np.ones(max_num_seqs, dtype=np.float32)
        self.greedy = np.zeros(max_num_seqs, dtype=bool)
        self.top_k = np.zeros(max_num_seqs, dtype=np.int64)  # 0: disabled
        self.top_p = np.ones(max_num_seqs, dtype=np.float32)
        self.min_p = np.zeros(max_num_seqs, dtype=np.float32)
        self.presence = np.zeros(max_num_seqs, dtype=np.float32)
        self.frequency = np.zeros(max_num_seqs, dtype=np.float32)
        self.repetition = np.ones(max_num_seqs, dtype=np.float32)
        self.min_tokens = np.zeros(max_num_seqs, dtype=np.int64)
        self.num_logprobs = np.full(max_num_seqs, -1, dtype=np.int64)  # -1: not requested
        self.num_prompt_logprobs = np.full(max_num_seqs, -1, dtype=np.int64)  # -1: not requested
        self.num_prompt_logprob_rows = 0  # live rows that asked for prompt logprobs
        self.seeded = np.zeros(max_num_seqs, dtype=bool)
        self.has_bias = np.zeros(max_num_seqs, dtype=bool)
        self.has_allowed = np.zeros(max_num_seqs, dtype=bool)  # allowed_token_ids
        self.has_bad_words = np.zeros(max_num_seqs, dtype=bool)
        self.needs_penalties = np.zeros(max_num_seqs, dtype=bool)
        self.has_logits_processors = np.zeros(max_num_seqs, dtype=bool)  # plug-ins named by the request
        # Sampling reads the output so far (penalties, plug-ins): wait for the step in flight first.
        self.needs_history = np.zeros(max_num_seqs, dtype=bool)
        # Greedy with nothing that changes or reads its logits (no bias, penalties, plug-ins,
        # logprobs or min_tokens): a step whose sampled rows all are takes the bare argmax.
        self.plain_greedy = np.zeros(max_num_seqs, dtype=bool)
        self.rows: dict[str, int] = {}
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        # Rows given up so far. A row only changes hands after a removal, so while this count is
        # unchanged every row still belongs to the request it belonged to (``record_sampled``).
        self.num_removals = 0

    def __len__(self) -> int:
        return len(self.rows)

    def remove(self, req_id: str) -> None:
        """Forget a finished, aborted or preempted request (unknown ids are ignored)."""
        row = self.rows.pop(req_id, None)
        if row is not None:
            self.sampling[row] = None
            if self.num_prompt_logprobs[row] >= 0:
                self.num_prompt_logprobs[row] = -1
                self.num_prompt_logprob_rows -= 1
            self._free_rows.append(row)
            self.num_removals += 1

    def update(self, req: ScheduledRequest) -> int:
        """Register a new request or append its new blocks; record its tokens. Returns its row."""
        row = self._register(req)
        self.record_tokens(row, req.start_pos, req.token_ids)
        return row

    def update_batch(
        self, requests: Sequence[ScheduledRequest], columns: StepColumns | None = None
    ) -> np.ndarray:
        """:meth:`update` for every request of a step (each request once), in order; returns
        their rows (int64). ``columns`` are the step's :class:`StepColumns` (derived from
        ``requests`` when None): only the records they name as changed (new, or with blocks
        appended) are read whole, and the scheduled tokens are recorded with one vectorized
        write instead of one small write per request (the bulk of the per-request cost at 256
        decodes)."""
        cols = columns if columns is not None else StepColumns.of(requests)
        for i in cols.changed:  # in order: a new request's row comes off the free list
            self._register(requests[i])
        num_seqs = len(cols.req_ids)
        rows = np.fromiter(map(self.rows.__getitem__, cols.req_ids), dtype=np.int64, count=num_seqs)
        q_lens = np.array(cols.num_tokens, dtype=np.int64)
        starts = np.array(cols.start_pos, dtype=np.int64)
        tokens = np.array(cols.token_ids, dtype=np.int64)
        if len(tokens) == num_seqs:  # one token per request (decode): no flattening needed
            self.token_ids[rows, starts] = tokens
        else:
            num_tokens = len(tokens)
            first = np.cumsum(q_lens) - q_lens  # each request's first index in ``tokens``
            offsets = np.arange(num_tokens) - np.repeat(first - starts, q_lens)  # positions
            self.token_ids[np.repeat(rows, q_lens), offsets] = tokens
        self.num_tokens[rows] = np.maximum(self.num_tokens[rows], starts + q_lens)
        return rows

    def _register(self, req: ScheduledRequest) -> int:
        """Add a new (or resumed) request, or append a running one's new blocks; its row."""
        if req.is_new:
            self.remove(req.req_id)
            return self._add(req)
        row = self.rows[req.req_id]
        if req.block_ids:
            self._append_blocks(row, req.block_ids)
        return row

    def record_tokens(self, row: int, start: int, tokens: Sequence[int]) -> None:
        end = start + len(tokens)
        self.token_ids[row, start:end] = tokens
        self.num_tokens[row] = max(int(self.num_tokens[row]), end)

    def record_sampled(
        self,
        rows: np.ndarray,
        positions: np.ndarray,
        tokens: Sequence[int],
        req_ids: Sequence[str] | None = None,
    ) -> None:
        """One sampled token per row (rows distinct) at ``positions``: vectorized record_tokens.

        With ``req_ids`` (tokens that arrive after later steps were planned), rows that no
        longer belong to the request they were sampled for are skipped.
        """
        if req_ids is not None:
            owned = np.fromiter(
                (self.rows.get(r) == row for r, row in zip(req_ids, rows.tolist(), strict=True)),
                dtype=bool,
                count=len(rows),
            )
            if not owned.all():
                rows, positions = rows[owned], positions[owned]
                tokens = [t for t, keep in zip(tokens, owned, strict=True) if keep]
        self.token_ids[rows, positions] = tokens
        self.num_tokens[rows] = np.maximum(self.num_tokens[rows], positions + 1)

    def record_verified(
        self, rows: np.ndarray, positions: np.ndarray, tokens: Sequence[int], req_ids: Sequence[str]
    ) -> None:
        """Speculative decoding: each row's token after its accepted drafts, at ``positions``; the
        row's known tokens end there (the step recorded all its drafts; rejected ones are dropped).
        Rows that no longer belong to their request are skipped, as in :meth:`record_sampled`."""
        owned = np.fromiter(
            (self.rows.get(r) == row for r, row in zip(req_ids, rows.tolist(), strict=True)),
            dtype=bool,
            count=len(rows),
        )
        tokens_array = np.asarray(tokens, dtype=np.int64)
        self.token_ids[rows[owned], positions[owned]] = tokens_array[owned]
        self.num_tokens[rows[owned]] = positions[owned] + 1

    def _add(self, req: ScheduledRequest) -> int:
        if req.params is None:
            raise ValueError(f"new request {req.req_id!r} comes without sampling params")
        if not self._free_rows:
            raise RuntimeError("more live requests than max_num_seqs")
        row = self._free_rows.pop()
        self.rows[req.req_id] = row
        self.num_blocks[row] = 0
        self._append_blocks(row, req.block_ids)
        self.prompt_len[row] = req.prompt_len
        known = req.prompt_len + len(req.output_token_ids)
        self.token_ids[row, : max(known, req.start_pos)] = UNKNOWN_TOKEN
        self.num_tokens[row] = 0
        prompt = getattr(req, "prompt_token_ids", None)  # full prompt, when the scheduler sends it
        if prompt:
            self.record_tokens(row, 0, prompt)
        self.record_tokens(row, req.prompt_len, req.output_token_ids)
        self._set_sampling(row, req.params)
        return row

    def _append_blocks(self, row: int, block_ids: Sequence[int]) -> None:
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.block_table_np.shape[1]:
            raise ValueError(f"block table row overflows max_blocks_per_seq ({self.block_table_np.shape[1]})")
        self.block_table_np[row, start:end] = block_ids
        self.num_blocks[row] = end

    def _set_sampling(self, row: int, params: SamplingParams) -> None:
        self.sampling[row] = self._row_sampling(params)
        self.greedy[row] = params.greedy
        self.temperature[row] = 1.0 if params.greedy else params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.repetition[row] = params.repetition_penalty
        self.min_tokens[row] = params.min_tokens
        self.num_logprobs[row] = -1 if params.logprobs is None else params.logprobs
        if params.prompt_logprobs is not None:
            self.num_prompt_logprobs[row] = params.prompt_logprobs
            self.num_prompt_logprob_rows += 1
        self.seeded[row] = params.seed is not None and not params.greedy
        self.has_bias[row] = bool(params.logit_bias)
        self.has_allowed[row] = params.allowed_token_ids is not None
        self.has_bad_words[row] = bool(params.bad_words_token_ids)
        self.needs_penalties[row] = params.needs_penalties
        self.has_logits_processors[row] = bool(params.logits_processors)
        # A bad word of several tokens is matched against the output so far.
        multi_token_bad_word = any(len(ids) > 1 for ids in params.bad_words_token_ids)
        self.needs_history[row] = (params.needs_penalties or bool(params.logits_processors)
                                   or multi_token_bad_word)
        self.plain_greedy[row] = (
            params.greedy and not params.logit_bias and not params.needs_penalties
            and not params.logits_processors and params.logprobs is None and params.min_tokens == 0
            and params.allowed_token_ids is None and not params.bad_words_token_ids
        )

    def _row_sampling(self, params: SamplingParams) -> RowSampling:
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device)
        return RowSampling(
            params=params,
            stop_ids=stop_ids,
            bias_ids=np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias)),
            bias_values=np.fromiter(
                params.logit_bias.values(), dtype=np.float32, count=len(params.logit_bias)
            ),
            generator=generator,
            allowed_ids=None if params.allowed_token_ids is None else np.unique(
                np.asarray(params.allowed_token_ids, dtype=np.int64)),
            bad_words=params.bad_words_token_ids,
        )
