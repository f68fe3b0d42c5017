"""Decode CUDA graphs, the CPU-checkable parts: size buckets and padded decode inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_worker.core.types import ScheduledRequest
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker.cuda_graphs import DecodeGraphs, bucket_for, decode_buckets
from gpu_worker.worker.request_state import RequestStates
from gpu_worker.worker.step_inputs import StepInputBuffers

CPU = torch.device("cpu")


def test_buckets_are_dense_when_small_and_end_at_the_maximum() -> None:
    assert decode_buckets(256) == (
        1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256,
    )
    assert decode_buckets(1) == (1,)
    assert decode_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert decode_buckets(100) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 100)
    with pytest.raises(ValueError):
        decode_buckets(0)


@pytest.mark.parametrize("max_size", [1, 7, 33, 100, 256, 512])
def test_every_batch_size_fits_the_smallest_bucket_above_it(max_size: int) -> None:
    buckets = decode_buckets(max_size)
    assert list(buckets) == sorted(set(buckets))
    for n in range(1, max_size + 1):
        b = bucket_for(buckets, n)
        assert b is not None and b >= n
        assert all(other < n for other in buckets if other < b)  # the smallest that fits
        assert b - n <= max(7, n // 2)  # padding waste stays bounded
    assert bucket_for(buckets, max_size + 1) is None
    assert bucket_for(buckets, 0) is None


def test_graphs_are_not_used_before_capture() -> None:
    graphs = DecodeGraphs(decode_buckets(8))
    assert not graphs.captured
    assert graphs.bucket_for(3) is None


def _decode_step(
    states: RequestStates, lens: list[int], rng: np.random.Generator
) -> tuple[list[ScheduledRequest], np.ndarray]:
    requests, rows = [], []
    params = SamplingParams(temperature=0.0)
    for i, n in enumerate(lens):
        blocks = tuple(int(b) for b in rng.choice(np.arange(1, 64), size=-(-n // 4), replace=False))
        req = ScheduledRequest(
            req_id=f"r{i}", token_ids=(int(rng.integers(1, 100)),), start_pos=n - 1, block_ids=blocks,
            sample=True, is_new=True, params=params, prompt_len=n - 1,
        )
        requests.append(req)
        rows.append(states.update(req))
    return requests, np.array(rows)


def test_padded_decode_inputs_are_inert_rows_after_the_real_ones() -> None:
    rng = np.random.default_rng(0)
    states = RequestStates(8, 16, 64, (), CPU)
    batch = StepInputBuffers(32, 8, 16, 4, CPU)
    # Dirty every buffer first: padding must overwrite stale values of earlier steps.
    for buf in (batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens):
        buf.np[:] = 77
    batch.block_tables.np[:] = 5
    requests, rows = _decode_step(states, [9, 3, 17], rng)
    inputs = batch.prepare(requests, rows, states, pad_to=8)

    assert inputs.num_tokens == 3  # the views cover the real rows only
    assert inputs.attn_metadata.decode_only
    assert batch.input_ids.np[:3].tolist() == [r.token_ids[0] for r in requests]
    assert batch.positions.np[:3].tolist() == [8, 2, 16]
    assert batch.seq_lens.np[:3].tolist() == [9, 3, 17]
    for i, r in enumerate(requests):  # real slots point into the request's own blocks
        pos = r.start_pos
        assert batch.slot_mapping.np[i] == r.block_ids[pos // 4] * 4 + pos % 4
    # Padding: token 0 at position 0, nothing stored, one context token in block 0.
    assert batch.input_ids.np[3:8].tolist() == [0] * 5
    assert batch.positions.np[3:8].tolist() == [0] * 5
    assert batch.slot_mapping.np[3:8].tolist() == [-1] * 5
    assert batch.seq_lens.np[3:8].tolist() == [1] * 5
    assert batch.block_tables.np[3:8, 0].tolist() == [0] * 5
    assert batch.query_start_loc.np[:9].tolist() == list(range(9))
    assert batch.logits_indices.np[:3].tolist() == [0, 1, 2]
    # Untouched beyond the bucket.
    assert batch.input_ids.np[8] == 77


def test_only_decode_steps_can_be_padded() -> None:
    states = RequestStates(4, 16, 64, (), CPU)
    batch = StepInputBuffers(32, 4, 16, 4, CPU)
    req = ScheduledRequest(
        req_id="p", token_ids=(1, 2, 3), start_pos=0, block_ids=(1,), sample=True, is_new=True,
        params=SamplingParams(), prompt_len=3,
    )
    row = states.update(req)
    with pytest.raises(ValueError, match="decode-only"):
        batch.prepare([req], np.array([row]), states, pad_to=2)
    assert batch.prepare([req], np.array([row]), states).num_tokens == 3  # eager is fine


def test_capture_inputs_are_all_padding() -> None:
    batch = StepInputBuffers(32, 8, 16, 4, CPU)
    batch.slot_mapping.np[:] = 9
    batch.upload_decode_padding(8)
    assert batch.slot_mapping.np[:8].tolist() == [-1] * 8
    assert batch.seq_lens.np[:8].tolist() == [1] * 8
    assert batch.query_start_loc.np[:9].tolist() == list(range(9))
