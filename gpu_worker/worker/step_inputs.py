"""Flat model inputs of one step, built with vectorized numpy into preallocated buffers.

Layout: the scheduled requests' new tokens packed back to back (scheduler order).
``input_ids``/``positions``/``slot_mapping`` are ``[T]``; ``query_start_loc`` ``[S + 1]``;
``seq_lens`` ``[S]``; ``block_tables`` ``[S, max_blocks]``. Host buffers are pinned on CUDA
and copied to fixed device buffers without a sync; the device tensors handed to the model
are prefixes (views) of those buffers, so their addresses never change (CUDA graphs).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpu_worker.core.types import ScheduledRequest
from gpu_worker.model_executor.layers.attention import AttentionMetadata
from gpu_worker.worker.request_state import RequestStates


@dataclass(frozen=True)
class StepInputs:
    """What one forward needs, plus where the sampled rows are."""

    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [N] int64, device: the last token of each sampled request
    # (speculative decoding: its last 1 + drafts tokens, one row per verified position)
    sample_rows: np.ndarray  # [N] state rows of the sampled requests
    sample_req_ids: tuple[str, ...]
    sample_positions: np.ndarray  # [N] position the sampled token will take (= its seq_len)
    # Placeholder tokens (async scheduling): input_ids[placeholder_dst[i]] must become the
    # previous step's sampled token number placeholder_src[i]. None when there are none.
    placeholder_dst: torch.Tensor | None = None  # [P] int64, device
    placeholder_src: torch.Tensor | None = None  # [P] int64, device
    # Speculative decoding (None: no request of the step has drafts): per sampled request, its
    # number of drafts and the drafts themselves ([N, max drafts], -1 padding), host arrays.
    num_draft_tokens: np.ndarray | None = None
    draft_token_ids: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class _Buffer:
    """A host buffer (pinned on CUDA) and its device twin (the same tensor on CPU)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")
        self.np = self.host.numpy()
        self.device = self.host if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)

    def upload(self, n: int, cols: int | None = None) -> torch.Tensor:
        """Copy the first ``n`` rows (and ``cols`` columns) to the device; returns the device view."""
        index = (slice(0, n),) if cols is None else (slice(0, n), slice(0, cols))
        if self.device is not self.host:
            self.device[index].copy_(self.host[index], non_blocking=True)
        return self.device[index]

    def upload_range(self, start: int, end: int, cols: int | None = None) -> None:
        """Copy rows ``start .. end - 1`` (first ``cols`` columns) to the device."""
        if self.device is self.host:
            return
        index = (slice(start, end),) if cols is None else (slice(start, end), slice(0, cols))
        self.device[index].copy_(self.host[index], non_blocking=True)


class StepInputBuffers:
    """Preallocated buffers that turn the scheduled requests of a step into flat device tensors.

    (Not vLLM's ``InputBatch``, the persistent per-request state: ours is
    :class:`~gpu_worker.worker.request_state.RequestStates`.)
    """

    def __init__(
        self,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.max_num_tokens = max_num_tokens
        self.input_ids = _Buffer((max_num_tokens,), torch.int64, device)
        self.positions = _Buffer((max_num_tokens,), torch.int64, device)
        self.slot_mapping = _Buffer((max_num_tokens,), torch.int64, device)
        self.query_start_loc = _Buffer((max_num_seqs + 1,), torch.int32, device)
        self.seq_lens = _Buffer((max_num_seqs,), torch.int32, device)
        self.block_tables = _Buffer((max_num_seqs, max_blocks_per_seq), torch.int32, device)
        # One row per sampled request, or per verified position with drafts (at most one per token).
        self.logits_indices = _Buffer((max(max_num_seqs, max_num_tokens),), torch.int64, device)
        self.placeholder_dst = _Buffer((max_num_seqs,), torch.int64, device)
        self.placeholder_src = _Buffer((max_num_seqs,), torch.int64, device)
        # Host buffers are rewritten each step: wait until the last step's async copies finished.
        self._uploaded = torch.cuda.Event() if device.type == "cuda" else None

    def prepare(
        self,
        requests: Sequence[ScheduledRequest],
        rows: np.ndarray,
        states: RequestStates,
        pad_to: int | None = None,
        prev_sample_ids: Sequence[str] | None = None,
        pad_tokens_to: int | None = None,
    ) -> StepInputs:
        """Fill the buffers for ``requests`` (whose state rows are ``rows``).

        ``pad_to`` (decode-only steps replayed by a CUDA graph): also fill and upload padding
        rows up to that many sequences (see :meth:`write_decode_padding`). ``pad_tokens_to``
        (mixed steps replayed by piecewise graphs): inert token rows up to that many tokens
        (:meth:`write_token_padding`). The returned views cover the real rows only.
        ``prev_sample_ids``: the request ids of the previous step's samples, in order; each
        placeholder token (``ids < 0``) gets the index of its request's sample among them, and
        is left for the caller to fill on the device.
        """
        if self._uploaded is not None:
            self._uploaded.synchronize()
        num_seqs = len(requests)
        q_lens = np.fromiter((len(r.token_ids) for r in requests), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((r.start_pos for r in requests), dtype=np.int64, count=num_seqs)
        num_tokens = int(q_lens.sum())
        if num_tokens > self.max_num_tokens:
            raise ValueError(f"step has {num_tokens} tokens, more than max_num_batched_tokens")
        seq_lens = starts + q_lens
        bs = self.block_size
        if np.any(seq_lens > states.num_blocks[rows] * bs):
            raise ValueError("a request's block table is too short for its scheduled tokens")

        qsl = self.query_start_loc.np[: num_seqs + 1]
        qsl[0] = 0
        np.cumsum(q_lens, out=qsl[1:])
        self.seq_lens.np[:num_seqs] = seq_lens
        ids = self.input_ids.np[:num_tokens]
        ids[:] = np.fromiter(
            itertools.chain.from_iterable(r.token_ids for r in requests), dtype=np.int64, count=num_tokens
        )
        tok_seq = np.repeat(np.arange(num_seqs), q_lens)
        positions = self.positions.np[:num_tokens]
        np.add(np.arange(num_tokens) - qsl[:-1][tok_seq], starts[tok_seq], out=positions)
        block_ids = states.block_table_np[rows[tok_seq], positions // bs]
        np.add(block_ids * bs, positions % bs, out=self.slot_mapping.np[:num_tokens])
        max_blocks = int(-(-int(seq_lens.max()) // bs))
        self.block_tables.np[:num_seqs, :max_blocks] = states.block_table_np[rows, :max_blocks]

        placeholders = np.flatnonzero(ids < 0)
        ph_dst: torch.Tensor | None = None
        ph_src: torch.Tensor | None = None
        if len(placeholders):
            if prev_sample_ids is None:
                raise ValueError("placeholder tokens in a step without a previous step's samples")
            num_ph = len(placeholders)
            self.placeholder_dst.np[:num_ph] = placeholders
            ph_req_ids = tuple(requests[i].req_id for i in tok_seq[placeholders].tolist())
            if ph_req_ids == tuple(prev_sample_ids):  # steady decode: the same requests, in order
                self.placeholder_src.np[:num_ph] = np.arange(num_ph)
            else:
                index = {rid: i for i, rid in enumerate(prev_sample_ids)}
                self.placeholder_src.np[:num_ph] = [index[rid] for rid in ph_req_ids]
            ph_dst, ph_src = self.placeholder_dst.upload(num_ph), self.placeholder_src.upload(num_ph)

        sample = np.fromiter((r.sample for r in requests), dtype=bool, count=num_seqs)
        num_sample = int(sample.sum())
        all_drafts = np.fromiter((r.num_draft_tokens for r in requests), dtype=np.int64, count=num_seqs)
        num_drafts = drafts = None
        if all_drafts.any():
            num_drafts, drafts = all_drafts[sample], _draft_ids(requests, sample, all_drafts)
            num_logits = self._fill_draft_logits_indices(qsl[1:][sample], num_drafts)
        else:
            num_logits = num_sample
            self.logits_indices.np[:num_sample] = qsl[1:][sample] - 1
        if pad_to is not None and pad_to > num_seqs:
            if num_tokens != num_seqs:
                raise ValueError("only decode-only steps (one token per sequence) can be padded")
            self.write_decode_padding(num_seqs, pad_to)
            self._upload_padding(num_seqs, pad_to, max_blocks)
        if pad_tokens_to is not None and pad_tokens_to > num_tokens:
            self.write_token_padding(num_tokens, pad_tokens_to)

        md = AttentionMetadata(
            slot_mapping=self.slot_mapping.upload(num_tokens),
            block_tables=self.block_tables.upload(num_seqs, max_blocks),
            query_start_loc=self.query_start_loc.upload(num_seqs + 1),
            seq_lens=self.seq_lens.upload(num_seqs),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
        )
        inputs = StepInputs(
            input_ids=self.input_ids.upload(num_tokens),
            positions=self.positions.upload(num_tokens),
            attn_metadata=md,
            logits_indices=self.logits_indices.upload(num_logits),
            sample_rows=rows[sample],
            sample_req_ids=tuple(r.req_id for r in itertools.compress(requests, sample.tolist())),
            sample_positions=seq_lens[sample],
            placeholder_dst=ph_dst,
            placeholder_src=ph_src,
            num_draft_tokens=num_drafts,
            draft_token_ids=drafts,
        )
        if self._uploaded is not None:
            self._uploaded.record()
        return inputs

    def _fill_draft_logits_indices(self, ends: np.ndarray, num_drafts: np.ndarray) -> int:
        """Logits rows of a step with drafts: each sampled request's last ``1 + drafts`` tokens
        (``ends``: one past each one's last token). Returns the number of rows."""
        counts = num_drafts + 1
        num_rows = int(counts.sum())
        first_row = np.cumsum(counts) - counts
        within = np.arange(num_rows) - np.repeat(first_row, counts)
        self.logits_indices.np[:num_rows] = np.repeat(ends - counts, counts) + within
        return num_rows

    def write_decode_padding(self, start: int, end: int) -> None:
        """Host rows ``start .. end - 1`` become inert decode rows.

        Token 0 at position 0, slot -1 (K/V not stored), context length 1 over block 0: the
        attention reads one valid cache row and the row's output is never sampled.
        """
        self._write_inert_tokens(start, end)
        self.seq_lens.np[start:end] = 1
        self.block_tables.np[start:end, 0] = 0
        self.query_start_loc.np[start + 1 : end + 1] = np.arange(start + 1, end + 1)

    def write_token_padding(self, start: int, end: int) -> None:
        """Token rows ``start .. end - 1`` become inert, on the host and the device: token 0 at
        position 0, slot -1 (K/V not stored). Rows no attention reads (a piecewise graph's padding)."""
        self._write_inert_tokens(start, end)
        for buf in (self.input_ids, self.positions, self.slot_mapping):
            buf.upload_range(start, end)

    def _write_inert_tokens(self, start: int, end: int) -> None:
        """Host token rows ``start .. end - 1``: token 0 at position 0, slot -1 (K/V not stored)."""
        self.input_ids.np[start:end] = 0
        self.positions.np[start:end] = 0
        self.slot_mapping.np[start:end] = -1

    def upload_token_padding(self, end: int) -> None:
        """Make token rows ``0 .. end - 1`` inert on the device (piecewise graph capture inputs)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        self.write_token_padding(0, end)
        if self._uploaded is not None:
            self._uploaded.record()

    def _upload_padding(self, start: int, end: int, max_blocks: int) -> None:
        for buf in (self.input_ids, self.positions, self.slot_mapping, self.seq_lens):
            buf.upload_range(start, end)
        self.query_start_loc.upload_range(start + 1, end + 1)
        self.block_tables.upload_range(start, end, max(max_blocks, 1))

    def upload_decode_padding(self, end: int) -> None:
        """Make rows ``0 .. end - 1`` inert decode rows on the device (graph capture inputs)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        self.write_decode_padding(0, end)
        self.query_start_loc.np[0] = 0
        self._upload_padding(0, end, 1)
        self.query_start_loc.upload_range(0, 1)
        if self._uploaded is not None:
            self._uploaded.record()


def _draft_ids(
    requests: Sequence[ScheduledRequest], sample: np.ndarray, num_drafts: np.ndarray
) -> np.ndarray:
    """The sampled requests' drafts (``num_drafts``: every request's), ``[N, max drafts]`` with
    -1 padding."""
    width = int(num_drafts.max())
    out = np.full((int(sample.sum()), width), -1, dtype=np.int64)
    i = 0
    for request, sampled, d in zip(requests, sample.tolist(), num_drafts.tolist(), strict=True):
        if sampled:
            if d:
                out[i, :d] = request.token_ids[-d:]
            i += 1
    return out
