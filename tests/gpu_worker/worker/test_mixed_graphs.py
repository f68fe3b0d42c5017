"""Piecewise graphs of mixed steps, the CPU-checkable parts: the token buckets, inert padding
rows, and where the model's forward splits into pieces (one attention point per layer, in
order, on fixed tensors). Capture and replay against eager steps: test_cuda_graphs_gpu.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_worker.worker.mixed_graphs import (
    AttentionPoint,
    MixedGraph,
    MixedGraphs,
    PiecewiseCapture,
    mixed_buckets,
)
from gpu_worker.worker.step_inputs import StepInputBuffers
from tests.gpu_worker.worker.conftest import make_runner


def test_buckets_are_powers_of_two_up_to_the_cap() -> None:
    assert mixed_buckets(512, 8192) == (16, 32, 64, 128, 256, 512)
    assert mixed_buckets(512, 256) == (16, 32, 64, 128, 256)  # never past the token budget
    assert mixed_buckets(300, 8192) == (16, 32, 64, 128, 256, 300)
    assert mixed_buckets(16, 8192) == (16,)
    assert mixed_buckets(0, 8192) == mixed_buckets(15, 8192) == ()  # off: mixed steps run eagerly
    graphs = MixedGraphs(mixed_buckets(512, 8192))
    assert graphs.bucket_for(20) is None  # nothing captured yet: eager


def test_token_padding_rows_are_inert() -> None:
    buffers = StepInputBuffers(64, 4, 8, 4, torch.device("cpu"))
    buffers.input_ids.np[:] = 7
    buffers.positions.np[:] = 9
    buffers.slot_mapping.np[:] = 3
    buffers.write_token_padding(5, 16)
    assert (buffers.input_ids.np[5:16] == 0).all() and (buffers.positions.np[5:16] == 0).all()
    assert (buffers.slot_mapping.np[5:16] == -1).all()  # their K/V are never stored
    assert (buffers.input_ids.np[:5] == 7).all() and (buffers.slot_mapping.np[16:] == 3).all()


def test_the_forward_splits_at_every_attention_on_fixed_tensors(tiny_model: Callable[[str], Path]) -> None:
    """Warm-up mode (nothing captured, as before each bucket's capture): each layer's attention
    call ends a piece, in layer order, and hands over its inputs (the rotated q; the K/V were
    stored by the fused kernel before it) and a shared output buffer; no attention runs and no
    K/V is written (the padding rows' slot is -1)."""
    runner = make_runner(tiny_model("llama"), max_num_batched_tokens=64, max_num_seqs=4)
    assert runner.mixed_graphs is None  # CPU: every step eager
    size = 32
    runner.inputs.upload_token_padding(size)
    caches = [c.clone() for c in runner.kv_caches]
    outs: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def out_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        buf = outs.setdefault((tuple(shape[1:]), dtype), torch.full((64, *shape[1:]), 0.5, dtype=dtype))
        return buf[: shape[0]]

    capture = PiecewiseCapture(out_buffer)
    hidden = runner._forward_piecewise(size, capture)
    layers = runner.model.model.layers  # type: ignore[union-attr]
    assert hidden.shape == (size, runner.hf_config.hidden_size) and bool(torch.isfinite(hidden).all())
    assert [p.module for p in capture.points] == [layer.self_attn.attn for layer in layers]
    assert [p.kv_cache.data_ptr() for p in capture.points] == [c.data_ptr() for c in runner.kv_caches]
    cfg = runner.hf_config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    for point in capture.points:
        assert point.q.shape == (size, heads, dim) and point.out.shape == point.q.shape
        assert point.out.data_ptr() == next(iter(outs.values())).data_ptr()  # one buffer, shared
        fused = layers[0].self_attn.rotary.stores_kv
        assert (point.k is None) == fused and (point.v is None) == fused
    assert capture.pieces == []  # warm-up captures nothing
    assert all(torch.equal(a, b) for a, b in zip(caches, runner.kv_caches, strict=True))
    assert np.all(runner.inputs.slot_mapping.np[:size] == -1)


def test_a_negative_mixed_graph_cap_is_refused() -> None:
    from gpu_worker.config import EngineConfig

    with pytest.raises(ValueError, match="mixed_graph_max_tokens must be >= 0"):
        EngineConfig(mixed_graph_max_tokens=-1)


class _Piece:
    """Stands in for a captured graph: records its replays in a shared log."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def replay(self) -> None:
        self.log.append(self.name)


class _Attention:
    """Stands in for PagedAttention: ``attend`` (K/V stored by the piece) or ``__call__`` (stores
    them), both returning ``q + 1`` and logging the rows and the metadata they saw."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, md: object, out: torch.Tensor) -> torch.Tensor:
        """As ``PagedAttention.attend`` with ``out``: the result is written there."""
        self.log.append(f"{self.name}.attend({q.shape[0]}, {md})")
        return out.copy_(q + 1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 md: object) -> torch.Tensor:
        assert k.shape[0] == v.shape[0] == q.shape[0]
        self.log.append(f"{self.name}.store_and_attend({q.shape[0]}, {md})")
        return q + 1


def test_replay_alternates_pieces_and_eager_attention_over_the_real_rows() -> None:
    """A bucket's replay: piece 0, attention 0 (on the step's metadata, over the real rows
    only, its result copied into the buffer the next piece reads), piece 1, ...; the padding
    rows of that buffer keep what they held."""
    log: list[str] = []
    bucket, real = 16, 5
    out = torch.full((bucket, 2, 4), -7.0)
    q0, q1 = torch.zeros(bucket, 2, 4), torch.full((bucket, 2, 4), 10.0)
    kv = torch.zeros(1)
    points = (
        _point(_Attention("a0", log), q0, None, out, kv),
        _point(_Attention("a1", log), q1, torch.zeros(bucket, 1, 4), out, kv),
    )
    pieces = tuple(_Piece(f"p{i}", log) for i in range(3))
    hidden = torch.zeros(bucket, 8)
    graph = MixedGraph(pieces, points, hidden)  # type: ignore[arg-type]
    assert graph.replay(real, "md") is hidden
    assert log == ["p0", "a0.attend(5, md)", "p1", "a1.store_and_attend(5, md)", "p2"]
    assert torch.equal(out[:real], q1[:real] + 1)  # the last attention's result, real rows only
    assert bool((out[real:] == -7.0).all())
    # attend writes its rows of the buffer itself (no copy after it): alone, a0 leaves q0 + 1.
    graph = MixedGraph(pieces[:2], points[:1], hidden)  # type: ignore[arg-type]
    graph.replay(real, "md")
    assert torch.equal(out[:real], q0[:real] + 1) and bool((out[real:] == -7.0).all())


def _point(module: object, q: torch.Tensor, k: torch.Tensor | None, out: torch.Tensor,
           kv: torch.Tensor) -> AttentionPoint:
    return AttentionPoint(module, q, k, k, kv, out)
