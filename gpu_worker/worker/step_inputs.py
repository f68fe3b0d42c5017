"""Flat model inputs of one step, built with vectorized numpy into preallocated buffers.

Layout: the scheduled requests' new tokens packed back to back (scheduler order).
``input_ids``/``positions``/``slot_mapping`` are ``[T]``; ``query_start_loc`` ``[S + 1]``;
``seq_lens`` ``[S]``; ``block_tables`` ``[S, max_blocks]``. Host buffers are pinned on CUDA
and copied to fixed device buffers without a sync; the device tensors handed to the model
are prefixes (views) of those buffers, so their addresses never change (CUDA graphs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpu_worker.core.types import ScheduledRequest, StepColumns
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
    # Every token of the step is a placeholder, in the previous step's sample order (a steady
    # decode step): input_ids are the previous step's sampled ids as they are (one copy).
    placeholders_in_order: bool = False
    # Speculative decoding (None: no request of the step has drafts): per sampled request, its
    # number of drafts and the drafts themselves ([N, max drafts], -1 padding), host arrays.
    num_draft_tokens: np.ndarray | None = None
    draft_token_ids: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


_ALIGN = 64  # bytes: each region of an arena starts on this boundary


class _Buffer:
    """A typed host buffer (pinned on CUDA) and its device twin (the same tensor on CPU).

    ``offset`` is its byte offset in the :class:`_Arena` that holds it (-1: a buffer of its own)."""

    def __init__(self, host: torch.Tensor, device: torch.Tensor, offset: int = -1) -> None:
        self.host = host
        self.np = host.numpy()
        self.device = device
        self.offset = offset
        self.row_bytes = host.stride(0) * host.element_size()

    @classmethod
    def standalone(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Buffer:
        """A buffer outside the arena; its host side is never copied from asynchronously (not pinned)."""
        host = torch.zeros(shape, dtype=dtype)
        return cls(host, host if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device))

    def end(self, rows: int) -> int:
        """The arena byte just past this buffer's first ``rows`` rows."""
        return self.offset + rows * self.row_bytes


class _Arena:
    """Typed regions of one byte buffer on the host (pinned on CUDA) and its device twin.

    A step's small inputs are written into the host regions, then :meth:`upload` moves the
    bytes from the arena's start to the end of what the step used in **one** host-to-device
    copy (earlier regions go whole, unused tails included: nothing reads those rows). One copy
    per buffer cost the host tens of microseconds each (dispatch, slicing, the pinned
    allocator's event) at every step. Regions keep fixed device addresses (CUDA graphs). On CPU
    the device twin is the host buffer itself.
    """

    def __init__(self, specs: Sequence[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> None:
        offsets, size = [], 0
        for shape, dtype in specs:
            offsets.append(size)
            size += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        self.host = torch.zeros(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.device = (
            self.host if device.type == "cpu" else torch.zeros(size, dtype=torch.uint8, device=device)
        )
        region = self._region
        self.buffers = [
            _Buffer(region(self.host, off, shape, dtype), region(self.device, off, shape, dtype), off)
            for off, (shape, dtype) in zip(offsets, specs, strict=True)
        ]

    @staticmethod
    def _region(buf: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return buf[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)

    def upload(self, end: int) -> None:
        """Copy the arena's first ``end`` bytes to the device (asynchronously from pinned memory)."""
        if self.device is not self.host and end > 0:
            self.device[:end].copy_(self.host[:end], non_blocking=True)


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
        max_logits = max(max_num_seqs, max_num_tokens)  # one per sampled request, or per verified position
        # Ordered so that a step's single upload (``_Arena.upload``) ends at the block tables'
        # staging copy, the only region whose size follows the step.
        self.arena = _Arena(
            [
                ((max_num_seqs + 1,), torch.int32),  # query_start_loc
                ((max_num_seqs,), torch.int32),  # seq_lens
                ((max_num_seqs,), torch.int64),  # placeholder_dst
                ((max_num_seqs,), torch.int64),  # placeholder_src
                ((max_num_tokens,), torch.int64),  # input_ids
                ((max_num_tokens,), torch.int64),  # positions
                ((max_num_tokens,), torch.int64),  # slot_mapping
                ((max_logits,), torch.int64),  # logits_indices
                ((max_num_seqs * max_blocks_per_seq,), torch.int32),  # block tables' staging copy
            ],
            device,
        )
        (self.query_start_loc, self.seq_lens, self.placeholder_dst, self.placeholder_src, self.input_ids,
         self.positions, self.slot_mapping, self.logits_indices, self._block_stage) = self.arena.buffers
        # The step's rows of the block tables (the model reads its rows at a fixed address, with
        # the full row stride); on CUDA they reach it through the staging region.
        self.block_tables = _Buffer.standalone((max_num_seqs, max_blocks_per_seq), torch.int32, device)
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
        columns: StepColumns | None = None,
    ) -> StepInputs:
        """Fill the buffers for ``requests`` (whose state rows are ``rows``).

        ``pad_to`` (decode-only steps replayed by a CUDA graph): also fill and upload padding
        rows up to that many sequences (see :meth:`write_decode_padding`). ``pad_tokens_to``
        (mixed steps replayed by piecewise graphs): inert token rows up to that many tokens
        (:meth:`write_token_padding`). The returned views cover the real rows only.
        ``prev_sample_ids``: the request ids of the previous step's samples, in order; each
        placeholder token (``ids < 0``) gets the index of its request's sample among them, and
        is left for the caller to fill on the device. ``columns``: the step's
        :class:`StepColumns` (derived from ``requests`` when None); the records themselves are
        read only for drafts.
        """
        if self._uploaded is not None:
            self._uploaded.synchronize()
        cols = columns if columns is not None else StepColumns.of(requests)
        num_seqs = len(cols.req_ids)
        q_lens = np.array(cols.num_tokens, dtype=np.int64)
        starts = np.array(cols.start_pos, dtype=np.int64)
        num_tokens = len(cols.token_ids)
        if num_tokens > self.max_num_tokens:
            raise ValueError(f"step has {num_tokens} tokens, more than max_num_batched_tokens")
        seq_lens = starts + q_lens
        bs = self.block_size
        if np.any(seq_lens > states.num_blocks[rows] * bs):
            raise ValueError("a request's block table is too short for its scheduled tokens")

        qsl = self.query_start_loc.np[: num_seqs + 1]
        self.seq_lens.np[:num_seqs] = seq_lens
        ids = self.input_ids.np[:num_tokens]
        ids[:] = cols.token_ids
        positions = self.positions.np[:num_tokens]
        if num_tokens == num_seqs and q_lens.min(initial=1) == 1:  # decodes: token i is sequence i's
            tok_seq = np.arange(num_seqs)
            qsl[:] = np.arange(num_seqs + 1)
            positions[:] = starts
            block_ids = states.block_table_np[rows, starts // bs]
        else:
            qsl[0] = 0
            np.cumsum(q_lens, out=qsl[1:])
            tok_seq = np.repeat(np.arange(num_seqs), q_lens)
            np.add(np.arange(num_tokens) - qsl[:-1][tok_seq], starts[tok_seq], out=positions)
            block_ids = states.block_table_np[rows[tok_seq], positions // bs]
        np.add(block_ids * bs, positions % bs, out=self.slot_mapping.np[:num_tokens])
        max_blocks = int(-(-int(seq_lens.max()) // bs))
        self.block_tables.np[:num_seqs, :max_blocks] = states.block_table_np[rows, :max_blocks]

        placeholders = np.flatnonzero(ids < 0)
        num_ph = len(placeholders)
        in_order = False
        if num_ph:
            if prev_sample_ids is None:
                raise ValueError("placeholder tokens in a step without a previous step's samples")
            self.placeholder_dst.np[:num_ph] = placeholders
            req_ids = cols.req_ids
            ph_req_ids = tuple(req_ids[i] for i in tok_seq[placeholders].tolist())
            if ph_req_ids == tuple(prev_sample_ids):  # steady decode: the same requests, in order
                self.placeholder_src.np[:num_ph] = np.arange(num_ph)
                in_order = num_ph == num_tokens  # then the placeholders are tokens 0 .. P - 1
            else:
                index = {rid: i for i, rid in enumerate(prev_sample_ids)}
                self.placeholder_src.np[:num_ph] = [index[rid] for rid in ph_req_ids]

        sample = np.array(cols.sample, dtype=bool)
        num_sample = int(sample.sum())
        all_drafts = np.array(cols.num_draft_tokens, dtype=np.int64)
        num_drafts = drafts = None
        if all_drafts.any():
            num_drafts, drafts = all_drafts[sample], _draft_ids(requests, sample, all_drafts)
            num_logits = self._fill_draft_logits_indices(qsl[1:][sample], num_drafts)
        else:
            num_logits = num_sample
            self.logits_indices.np[:num_sample] = qsl[1:][sample] - 1
        table_rows = num_seqs
        if pad_to is not None and pad_to > num_seqs:
            if num_tokens != num_seqs:
                raise ValueError("only decode-only steps (one token per sequence) can be padded")
            self.write_decode_padding(num_seqs, pad_to)
            table_rows = pad_to
        if pad_tokens_to is not None and pad_tokens_to > num_tokens:
            self.write_token_padding(num_tokens, pad_tokens_to)
        self._upload(table_rows, max_blocks)

        md = AttentionMetadata(
            slot_mapping=self.slot_mapping.device[:num_tokens],
            block_tables=self.block_tables.device[:num_seqs, :max_blocks],
            query_start_loc=self.query_start_loc.device[: num_seqs + 1],
            seq_lens=self.seq_lens.device[:num_seqs],
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            num_decodes=_leading_decodes(q_lens),
        )
        inputs = StepInputs(
            input_ids=self.input_ids.device[:num_tokens],
            positions=self.positions.device[:num_tokens],
            attn_metadata=md,
            logits_indices=self.logits_indices.device[:num_logits],
            sample_rows=rows[sample],
            sample_req_ids=tuple(itertools.compress(cols.req_ids, cols.sample)),
            sample_positions=seq_lens[sample],
            placeholder_dst=self.placeholder_dst.device[:num_ph] if num_ph else None,
            placeholder_src=self.placeholder_src.device[:num_ph] if num_ph else None,
            placeholders_in_order=in_order,
            num_draft_tokens=num_drafts,
            draft_token_ids=drafts,
        )
        if self._uploaded is not None:
            self._uploaded.record()
        return inputs

    def _upload(self, table_rows: int, table_cols: int) -> None:
        """Send what the host buffers hold to the device: the arena in one copy, through the
        block tables' first ``table_rows`` x ``table_cols`` (staged contiguously, so that no
        strided host copy is needed), which one device copy then puts in their rows."""
        if self.arena.device is self.arena.host:
            return  # CPU: the model reads the host buffers themselves
        n = table_rows * table_cols
        stage = self._block_stage
        stage.np[:n].reshape(table_rows, table_cols)[:] = self.block_tables.np[:table_rows, :table_cols]
        self.arena.upload(stage.end(n))
        if n:
            self.block_tables.device[:table_rows, :table_cols].copy_(
                stage.device[:n].view(table_rows, table_cols), non_blocking=True
            )

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
        """Token rows ``start .. end - 1`` become inert on the host (the next upload sends them):
        token 0 at position 0, slot -1 (K/V not stored). Rows no attention reads (a piecewise
        graph's padding)."""
        self._write_inert_tokens(start, end)

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
        self.arena.upload(self.slot_mapping.end(end))  # input_ids and positions come before it
        if self._uploaded is not None:
            self._uploaded.record()

    def upload_decode_padding(self, end: int) -> None:
        """Make rows ``0 .. end - 1`` inert decode rows on the device (graph capture inputs)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        self.write_decode_padding(0, end)
        self.query_start_loc.np[0] = 0
        self._upload(end, 1)
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


def _leading_decodes(q_lens: np.ndarray) -> int:
    """How many sequences at the front of the step have one query token each (the attention's
    ``num_decodes`` hint: a one-token query is a decode whatever the request's phase)."""
    not_one = np.flatnonzero(q_lens != 1)
    return int(not_one[0]) if not_one.size else int(q_lens.size)
