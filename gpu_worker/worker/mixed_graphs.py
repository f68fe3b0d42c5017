"""Piecewise CUDA graphs for mixed steps (prefill chunks beside decodes): all but the attention.

A decode-only step replays one graph of the whole model (:mod:`gpu_worker.worker.cuda_graphs`).
A step with a prefill chunk cannot: its attention's tiling and grid depend on the step's query
and context lengths (host ints, ``kernels.triton_ops.prefill_attention.choose_tiles``). Run
eagerly, such a step pays every launch on the host (about 320 Triton launches and 130 cuBLAS
calls for llama3-8b), which on an H200 took longer than its kernels: 16-35 ms per step beside
a 32k prefill whatever the chunk's size (docs/BENCHMARKS.md, W6 ITL). So, as vLLM's piecewise
graphs do, everything between two attention calls is captured, per token-count bucket, and
each attention runs eagerly between the pieces, on the step's real metadata:

    piece 0 (embedding, layer 0 up to its attention) -> attention 0 -> piece 1 (layer 0's
    o_proj and MLP, layer 1 up to its attention) -> ... -> piece L (the last MLP, final norm)

How a piece boundary is found: while a bucket is captured, the model runs on an
``AttentionMetadata`` whose ``piecewise`` is a :class:`PiecewiseCapture`; each
``PagedAttention`` call hands it its inputs instead of attending (:meth:`PiecewiseCapture.split`):
the capture ends the current graph there, remembers the call (:class:`AttentionPoint`: the
module, its input tensors, which the graph writes at fixed addresses) and starts the next graph,
and returns the fixed output buffer the next piece reads. At replay each point calls the same
module on the real metadata over the first ``num_tokens`` rows and copies the result into that
buffer. Padding rows (``num_tokens`` up to the bucket) carry token 0, position 0 and slot -1 (no
K/V stored); attention never reads them and no other op mixes rows, and they are never sampled.

What a piece may read from the metadata: only ``slot_mapping`` (the fused rotary + KV store),
which is the runner's fixed buffer. The model itself knows nothing of this beyond the one hook
in ``PagedAttention``. Not used with pipeline or tensor parallelism, nor for the first real step
with fp8 KV scales to compute (the runner runs those eagerly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from gpu_worker.worker.cuda_graphs import bucket_for

_MIN_BUCKET = 16


def mixed_buckets(max_tokens: int, token_budget: int) -> tuple[int, ...]:
    """Token counts to capture: powers of two from 16, then ``min(max_tokens, token_budget)``
    itself; empty when that is below 16 (mixed steps then run eagerly)."""
    top = min(max_tokens, token_budget)
    if top < _MIN_BUCKET:
        return ()
    sizes = []
    size = _MIN_BUCKET
    while size < top:
        sizes.append(size)
        size *= 2
    return (*sizes, top)


@dataclass(frozen=True)
class AttentionPoint:
    """One attention call between two pieces: ``module.attend(q, kv_cache, md)`` (``k`` None: this
    step's K/V were stored by the piece before) or ``module(q, k, v, kv_cache, md)``, on tensors
    the piece before writes at fixed addresses; the result goes to ``out``."""

    module: Any  # PagedAttention (not imported: the model layer imports nothing from the runner)
    q: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    kv_cache: torch.Tensor
    out: torch.Tensor

    def run(self, num_tokens: int, md: Any) -> None:
        """Attend over the step's ``num_tokens`` real rows and leave the result in ``out``."""
        q, out = self.q[:num_tokens], self.out[:num_tokens]
        if self.k is None or self.v is None:
            self.module.attend(q, self.kv_cache, md, out=out)  # the kernels write out in place
        else:
            out.copy_(self.module(q, self.k[:num_tokens], self.v[:num_tokens], self.kv_cache, md))


class PiecewiseCapture:
    """What the model's attention layers call while one bucket is warmed up (``capture`` False:
    nothing is captured, the pieces run once so that kernels compile outside the capture) or
    captured (into graphs on the memory pool ``pool``). ``out_buffer(shape, dtype)`` gives the
    fixed output buffer of an attention."""

    def __init__(self, out_buffer: Callable[[torch.Size, torch.dtype], torch.Tensor],
                 pool: Any = None, capture: bool = False) -> None:
        self._out_buffer = out_buffer
        self._pool = pool
        self._capture = capture
        self.points: list[AttentionPoint] = []
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self._graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        """Start a piece (the first: call on the capture stream, before the model runs)."""
        if self._capture:
            self._graph = torch.cuda.CUDAGraph()
            self._graph.capture_begin(pool=self._pool)

    def end(self) -> None:
        """End the piece being captured (the last: after the model returned)."""
        if self._graph is not None:
            self._graph.capture_end()
            self.pieces.append(self._graph)
            self._graph = None

    def split(self, module: Any, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
              kv_cache: torch.Tensor) -> torch.Tensor:
        """An attention call at a piece boundary: end this piece, record the call, start the next
        piece; returns the output buffer the next piece reads (``[T, Hq, D]``, like ``q``)."""
        self.end()
        out = self._out_buffer(q.shape, q.dtype)
        self.points.append(AttentionPoint(module, q, k, v, kv_cache, out))
        self.begin()
        return out


@dataclass(frozen=True)
class MixedGraph:
    """The pieces and attention points of one bucket, and the hidden states the last piece writes."""

    pieces: tuple[torch.cuda.CUDAGraph, ...]
    points: tuple[AttentionPoint, ...]
    hidden: torch.Tensor  # [bucket, H]

    def replay(self, num_tokens: int, md: Any) -> torch.Tensor:
        """Run the step: piece, attention, piece, ...; returns the (reused) ``[bucket, H]`` output."""
        self.pieces[0].replay()
        for point, piece in zip(self.points, self.pieces[1:], strict=True):
            point.run(num_tokens, md)
            piece.replay()
        return self.hidden


class MixedGraphs:
    """Captured mixed-step graphs by bucket (token count), sharing one memory pool and one
    attention output buffer per shape (each attention's result is read by the next piece before
    the following attention writes it: one stream orders them)."""

    def __init__(self, buckets: Iterable[int]) -> None:
        self.buckets = tuple(sorted(set(buckets)))
        self._graphs: dict[int, MixedGraph] = {}
        self._outs: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    @property
    def captured(self) -> bool:
        return bool(self.buckets) and len(self._graphs) == len(self.buckets)

    def bucket_for(self, num_tokens: int) -> int | None:
        """The bucket a mixed step of ``num_tokens`` tokens replays, or None (run it eagerly)."""
        return bucket_for(self.buckets, num_tokens) if self.captured else None

    def _out_buffer(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        rows, rest = self.buckets[-1], tuple(shape[1:])
        buf = self._outs.get((rest, dtype))
        if buf is None:  # zeros: padding rows the next piece reads stay finite
            buf = self._outs[(rest, dtype)] = torch.zeros((rows, *rest), dtype=dtype, device=device)
        return buf[: shape[0]]

    def capture(self, forward: Callable[[int, PiecewiseCapture], torch.Tensor], device: torch.device) -> None:
        """Capture every bucket, largest first. ``forward(size, capture)`` runs the model over the
        first ``size`` rows of the runner's fixed buffers with ``capture`` in its metadata."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)

        def out_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
            return self._out_buffer(shape, dtype, device)

        for size in sorted(self.buckets, reverse=True):
            forward(size, PiecewiseCapture(out_buffer))  # eager warm-up: compiles outside the capture
            torch.cuda.synchronize(device)
            rec = PiecewiseCapture(out_buffer, pool=pool, capture=True)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                rec.begin()
                hidden = forward(size, rec)
                rec.end()
            torch.cuda.current_stream(device).wait_stream(stream)
            self._graphs[size] = MixedGraph(tuple(rec.pieces), tuple(rec.points), hidden)
        torch.cuda.synchronize(device)

    def replay(self, size: int, num_tokens: int, md: Any) -> torch.Tensor:
        """Run bucket ``size`` for a step of ``num_tokens`` tokens with metadata ``md``."""
        return self._graphs[size].replay(num_tokens, md)

    def clear(self) -> None:
        """Drop the graphs (their pool is released with them) and the output buffers."""
        self._graphs.clear()
        self._outs.clear()
