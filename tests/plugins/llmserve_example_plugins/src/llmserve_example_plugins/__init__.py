"""Example llmserve plug-ins, one of each kind (see docs/PLUGINS.md).

* ``example_ban_tokens`` (logits processor): args ``{"token_ids": [...]}``; those tokens are
  never sampled.
* ``example_max_chars`` (stopping criterion): args ``{"chars": N}``; the sequence ends with the
  first token that brings its text to at least N characters.
* ``example_shortest_prompt_first`` (scheduling policy): shorter prompts are admitted first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gpu_worker.plugins import (
    LogitsProcessor,
    ProcessorRow,
    RankedRequest,
    SchedulingPolicy,
    StoppingCriterion,
)


class BanTokens(LogitsProcessor):
    """Forbids the token ids listed in ``args["token_ids"]``, per request, in one device op."""

    name = "example_ban_tokens"

    @classmethod
    def validate_args(cls, args: Any) -> None:
        ids = args.get("token_ids") if isinstance(args, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError("example_ban_tokens needs args {'token_ids': [non-negative ints, ...]}")

    def __call__(self, logits: torch.Tensor, rows: Sequence[ProcessorRow]) -> torch.Tensor:
        pairs = [(i, t) for i, row in enumerate(rows) for t in row.args["token_ids"] if t < self.vocab_size]
        row_ids = [i for i, _ in pairs]
        token_ids = [t for _, t in pairs]
        index = (torch.tensor(row_ids, device=logits.device), torch.tensor(token_ids, device=logits.device))
        return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))


class MaxChars(StoppingCriterion):
    """Ends the sequence once its text has at least ``args["chars"]`` characters."""

    name = "example_max_chars"

    @classmethod
    def validate_args(cls, args: Any) -> None:
        chars = args.get("chars") if isinstance(args, dict) else None
        if not isinstance(chars, int) or isinstance(chars, bool) or chars < 1:
            raise ValueError("example_max_chars needs args {'chars': a positive int}")

    def __call__(self, token_ids: Sequence[int], text: str) -> bool:
        return len(text) >= self.args["chars"]


class ShortestPromptFirst(SchedulingPolicy):
    """Admits shorter prompts first (first come, first served among equal lengths)."""

    name = "example_shortest_prompt_first"

    def rank(self, request: RankedRequest) -> float:
        return len(request.prompt_token_ids)
