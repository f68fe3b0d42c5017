"""Applying a step's grammar bitmask to the sampled logits rows, on the device, in one op."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from gpu_worker.core.types import GrammarBitmask


class GrammarMask:
    """A logits stage (``logits -> logits``) that sets the tokens a grammar forbids to ``-inf``.

    Built once per step from the core's :class:`GrammarBitmask` and the step's sampled rows:
    the rows of unconstrained requests keep an all-ones mask and are left out of ``indices``, so
    one xgrammar kernel call (its CPU kernel, or its CUDA/Triton one) masks the whole batch.
    ``row_of`` gives each request's first row; with speculative decoding a request has
    ``grammar.row_counts`` consecutive rows (one per verified position).
    """

    def __init__(self, grammar: GrammarBitmask, row_of: Mapping[str, int], num_rows: int,
                 device: torch.device) -> None:
        words = grammar.bitmask.shape[1]
        full = np.full((num_rows, words), -1, dtype=np.int32)
        counts = grammar.row_counts or (1,) * len(grammar.req_ids)
        indices = [
            row_of[rid] + j for rid, count in zip(grammar.req_ids, counts, strict=True) for j in range(count)
        ]
        full[indices] = grammar.bitmask
        host = torch.from_numpy(full)
        if device.type == "cuda":
            host = host.pin_memory()
        self.bitmask = host.to(device, non_blocking=True)
        self.indices = indices

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        import xgrammar as xgr

        logits = logits.contiguous()
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=logits.shape[-1],
                                        indices=self.indices)
        return logits
