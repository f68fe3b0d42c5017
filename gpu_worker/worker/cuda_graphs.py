"""CUDA graphs for decode-only steps: one graph per batch-size bucket, captured at warm-up.

A decode step of ``n`` sequences is padded to the smallest bucket ``b >= n`` and replays the
graph captured for ``b`` over the runner's fixed input buffers (their addresses never change,
see :mod:`gpu_worker.worker.step_inputs`). Padding rows carry slot ``-1`` (their K/V are not
stored), context length 1 and block 0, so they read one valid cache row and write nothing;
their outputs are never sampled. The graph is a transform the runner applies to the model
call; the model itself knows nothing about it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

import torch

# Small batches are common at low load, where padding costs most: dense buckets there.
_DENSE_BUCKETS = (1, 2, 4, 8, 16, 24, 32)


def decode_buckets(max_size: int) -> tuple[int, ...]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 24, 32, then steps of 16 to 128, then of 32.

    Always ends with ``max_size`` itself, so every decode batch that fits the runner fits a
    bucket; padding adds at most 7 rows up to 32 sequences, 15 up to 128, 31 beyond.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    sizes = [*_DENSE_BUCKETS, *range(48, 129, 16), *range(160, max_size + 1, 32)]
    kept = [s for s in sizes if s < max_size]
    return (*kept, max_size)


def bucket_for(buckets: tuple[int, ...], num_seqs: int) -> int | None:
    """The smallest bucket holding ``num_seqs`` sequences (``buckets`` sorted), or None."""
    i = bisect.bisect_left(buckets, num_seqs)
    return buckets[i] if i < len(buckets) and num_seqs > 0 else None


class DecodeGraphs:
    """Captured decode graphs, keyed by bucket size, sharing one memory pool.

    ``forward(size)`` must run the model over the first ``size`` rows of the runner's fixed
    buffers and return its output (the runner's: the logits of every row, or the hidden states
    where the LM head stays out of the graph); it is called eagerly once per size (Triton
    compilation and cuBLAS heuristics happen outside the capture), then captured.
    """

    def __init__(self, buckets: Iterable[int]) -> None:
        self.buckets = tuple(sorted(set(buckets)))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def captured(self) -> bool:
        return len(self._graphs) == len(self.buckets)

    def bucket_for(self, num_seqs: int) -> int | None:
        """The bucket a decode batch of ``num_seqs`` replays, or None (run it eagerly)."""
        if not self.captured:
            return None
        return bucket_for(self.buckets, num_seqs)

    def capture(self, forward: Callable[[int], torch.Tensor], device: torch.device) -> None:
        """Capture every bucket, largest first, so the smaller graphs reuse its memory."""
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(self.buckets, reverse=True):
            forward(size)  # eager warm-up of this shape
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward(size)
            self._graphs[size] = (graph, out)
        torch.cuda.synchronize(device)

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of bucket ``size``; returns its (reused) ``[size, ...]`` output."""
        graph, out = self._graphs[size]
        graph.replay()
        return out

    def clear(self) -> None:
        """Drop the graphs and release their memory pool."""
        self._graphs.clear()
