"""A step's flat inputs (``StepInputBuffers.prepare``) and request state (``RequestStates.update_batch``)
against a per-token reference built here, over steps mixing full and chunked prefills, a resumed
preempted request, decodes with async-scheduling placeholders, drafts, a finished request whose
row is reused and new blocks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from gpu_worker.core.types import PLACEHOLDER_TOKEN_ID, ScheduledRequest
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker.request_state import RequestStates
from gpu_worker.worker.step_inputs import StepInputBuffers

BS = 4
CPU = torch.device("cpu")
PH = PLACEHOLDER_TOKEN_ID
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


def _new(req_id: str, prompt: list[int], blocks: list[int], n: int | None = None,
         outputs: Sequence[int] = ()) -> ScheduledRequest:
    """A request new to the runner: its first ``n`` tokens of prompt + outputs (all by default)."""
    tokens = prompt + list(outputs)
    n = len(tokens) if n is None else n
    return ScheduledRequest(
        req_id=req_id, token_ids=tuple(tokens[:n]), start_pos=0, block_ids=tuple(blocks),
        sample=n == len(tokens), is_new=True, params=GREEDY, prompt_len=len(prompt),
        output_token_ids=tuple(outputs), prompt_token_ids=tuple(prompt),
    )


def _running(req_id: str, tokens: Sequence[int], start: int, new_blocks: Sequence[int] = (),
             sample: bool = True, drafts: int = 0) -> ScheduledRequest:
    return ScheduledRequest(
        req_id=req_id, token_ids=tuple(tokens), start_pos=start, block_ids=tuple(new_blocks),
        sample=sample, num_draft_tokens=drafts,
    )


def _steps() -> list[tuple[list[ScheduledRequest], set[str], tuple[str, ...] | None]]:
    """(requests, finished or preempted ids removed first, the previous step's sampled ids)."""
    return [
        (
            [
                _new("a", list(range(100, 110)), [7, 3, 9]),  # full prefill, 10 tokens
                _new("b", list(range(200, 209)), [1, 2], n=5),  # first chunk of 9
                _new("c", [31, 32, 33, 34, 35, 36], [4, 5], outputs=[11, 12]),  # resumed after preemption
            ],
            set(),
            None,
        ),
        (
            [
                _running("a", [PH], 10),  # decode, its token is the previous step's sample
                _running("b", [205, 206, 207, 208], 5, new_blocks=[8]),  # last chunk
                _running("c", [PH], 8, new_blocks=[10]),  # decode into a new block
            ],
            set(),
            ("a", "c"),
        ),
        (
            [
                _new("e", [41, 42, 43], [12]),  # takes the row c leaves
                _running("a", [77, 50, 51], 11, new_blocks=[11], drafts=2),  # real token + 2 drafts
                _running("b", [PH], 9, new_blocks=[13]),
            ],
            {"c"},
            ("a", "b", "c"),
        ),
        (
            [  # decodes only (one token each: prepare's decode path; padded to 4 rows below)
                _running("e", [PH], 3),
                _running("a", [PH], 14),
                _running("b", [PH], 10),
            ],
            set(),
            ("e", "a", "b"),
        ),
    ]


def _reference(requests: Sequence[ScheduledRequest], tables: dict[str, list[int]],
               prev: tuple[str, ...] | None) -> dict[str, list[int]]:
    """The step's inputs computed token by token."""
    out: dict[str, list[int]] = {k: [] for k in ("ids", "pos", "slots", "qsl", "seq_lens", "logits",
                                                 "ph_dst", "ph_src")}
    out["qsl"].append(0)
    for req in requests:
        for j, token in enumerate(req.token_ids):
            pos = req.start_pos + j
            if token == PH:
                assert prev is not None
                out["ph_dst"].append(len(out["ids"]))
                out["ph_src"].append(prev.index(req.req_id))
            out["ids"].append(token)
            out["pos"].append(pos)
            out["slots"].append(tables[req.req_id][pos // BS] * BS + pos % BS)
        out["qsl"].append(len(out["ids"]))
        out["seq_lens"].append(req.start_pos + len(req.token_ids))
        if req.sample:
            end = len(out["ids"])
            out["logits"].extend(range(end - 1 - req.num_draft_tokens, end))
    return out


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(x) for x in t.tolist()]


DEVICES = [
    pytest.param(CPU, id="cpu"),
    pytest.param(torch.device("cuda"), id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_and_update_batch_match_a_per_token_reference(device: torch.device) -> None:
    """On CUDA the inputs are read back from the device: the one-copy upload of the arena and the
    staged block-table rows deliver what the host buffers hold."""
    states = RequestStates(4, 8, 32, [2], device)
    one_by_one = RequestStates(4, 8, 32, [2], device)  # the per-request update path, for comparison
    buffers = StepInputBuffers(64, 4, 8, BS, device)
    tables: dict[str, list[int]] = {}
    for requests, removed, prev in _steps():
        for req_id in removed:
            states.remove(req_id)
            one_by_one.remove(req_id)
            del tables[req_id]
        for req in requests:
            old = [] if req.is_new else tables[req.req_id]
            tables[req.req_id] = old + list(req.block_ids)
        rows = states.update_batch(requests)
        assert rows.tolist() == [one_by_one.update(r) for r in requests]
        for name in ("token_ids", "num_tokens", "num_blocks", "block_table_np", "prompt_len"):
            np.testing.assert_array_equal(getattr(states, name), getattr(one_by_one, name), err_msg=name)

        for prev_ids in ([prev] if prev is None else [prev, tuple(reversed(prev)) + ("zz",)]):
            ref = _reference(requests, tables, prev_ids)
            decodes = all(len(r.token_ids) == 1 for r in requests)
            inputs = buffers.prepare(requests, rows, states, prev_sample_ids=prev_ids,
                                     pad_to=4 if decodes else None)
            md = inputs.attn_metadata
            if decodes:  # the padding row, as the graph reads it on the device: inert
                n = len(requests)
                assert _ints(buffers.seq_lens.device[n:4]) == [1]
                assert _ints(buffers.slot_mapping.device[n:4]) == [-1]
                assert _ints(buffers.block_tables.device[n:4, 0]) == [0]
                assert _ints(buffers.query_start_loc.device[: 4 + 1]) == list(range(5))
            assert _ints(inputs.input_ids) == ref["ids"]
            assert _ints(inputs.positions) == ref["pos"]
            assert _ints(md.slot_mapping) == ref["slots"]
            assert _ints(md.query_start_loc) == ref["qsl"]
            assert _ints(md.seq_lens) == ref["seq_lens"]
            assert md.max_query_len == max(len(r.token_ids) for r in requests)
            assert md.max_seq_len == max(ref["seq_lens"])
            # The decodes that lead the step (step 2: "a" before the chunk of "b"; step 4: all).
            leading = next((i for i, r in enumerate(requests) if len(r.token_ids) != 1), len(requests))
            assert md.num_decodes == leading
            for i, req in enumerate(requests):  # the columns a row's attention reads
                n_blocks = -(-ref["seq_lens"][i] // BS)
                assert _ints(md.block_tables[i, :n_blocks]) == tables[req.req_id][:n_blocks]
            assert _ints(inputs.logits_indices) == ref["logits"]
            assert _ints(inputs.placeholder_dst) == ref["ph_dst"]
            assert _ints(inputs.placeholder_src) == ref["ph_src"]
            # In order: every token a placeholder, gathered from samples 0 .. n - 1 (one copy).
            in_order = bool(ref["ph_dst"]) and ref["ph_dst"] == list(range(len(ref["ids"]))) == ref["ph_src"]
            assert inputs.placeholders_in_order == in_order
            sampled = [(i, r) for i, r in enumerate(requests) if r.sample]
            assert inputs.sample_req_ids == tuple(r.req_id for _, r in sampled)
            assert inputs.sample_rows.tolist() == [int(rows[i]) for i, _ in sampled]
            assert inputs.sample_positions.tolist() == [ref["seq_lens"][i] for i, _ in sampled]
            if any(r.num_draft_tokens for r in requests):
                assert inputs.num_draft_tokens is not None and inputs.draft_token_ids is not None
                assert inputs.num_draft_tokens.tolist() == [r.num_draft_tokens for _, r in sampled]
                a = inputs.draft_token_ids[[r.req_id for _, r in sampled].index("a")]
                assert a.tolist() == [50, 51]
            else:
                assert inputs.num_draft_tokens is None


def test_placeholder_of_a_request_missing_from_the_previous_samples_is_an_error() -> None:
    states = RequestStates(2, 4, 16, [2], CPU)
    buffers = StepInputBuffers(16, 2, 4, BS, CPU)
    rows = states.update_batch([_new("a", [5, 6, 7], [0])])
    step = [_running("a", [PH], 3)]
    rows = states.update_batch(step)
    with pytest.raises(KeyError):
        buffers.prepare(step, rows, states, prev_sample_ids=("b",))
    with pytest.raises(ValueError, match="placeholder"):
        buffers.prepare(step, rows, states, prev_sample_ids=None)


def test_the_arena_holds_every_input_in_disjoint_aligned_regions_in_upload_order() -> None:
    """One copy from the arena's start to the staged block-table rows covers every input: the
    regions come in that order, do not overlap, and start on 64-byte boundaries."""
    buffers = StepInputBuffers(64, 4, 8, BS, CPU)
    order = [buffers.query_start_loc, buffers.seq_lens, buffers.placeholder_dst, buffers.placeholder_src,
             buffers.input_ids, buffers.positions, buffers.slot_mapping, buffers.logits_indices]
    assert buffers.arena.buffers[: len(order)] == order
    shapes = [(5,), (4,), (4,), (4,), (64,), (64,), (64,), (64,), (4 * 8,)]
    dtypes = [torch.int32] * 2 + [torch.int64] * 6 + [torch.int32]
    end = 0
    for buf, shape, dtype in zip(buffers.arena.buffers, shapes, dtypes, strict=True):
        assert tuple(buf.host.shape) == shape and buf.host.dtype == dtype
        assert buf.offset % 64 == 0 and buf.offset >= end
        assert buf.host.data_ptr() == buffers.arena.host.data_ptr() + buf.offset
        end = buf.end(shape[0])
        assert end == buf.offset + buf.host.numel() * buf.host.element_size()
    assert end <= buffers.arena.host.numel()
    assert buffers.block_tables.offset == -1 and tuple(buffers.block_tables.host.shape) == (4, 8)
