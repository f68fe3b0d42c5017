"""``speculative_config``: which proposer drafts tokens and how many (vLLM's shape).

Torch-free: :class:`~gpu_worker.config.EngineConfig` holds it and the worker's flag parses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

NGRAM = "ngram"
DRAFT_MODEL = "draft_model"
METHODS = (NGRAM, DRAFT_MODEL)
# vLLM's n-gram defaults when neither bound is given (its SpeculativeConfig).
DEFAULT_PROMPT_LOOKUP = 5


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding of one engine (docs/SPEC_DECODE.md).

    ``method`` ``ngram``: drafts are the tokens that followed the latest earlier occurrence of the
    sequence's last ``n`` tokens, ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``
    (prompt lookup decoding; CPU only, no model). When only one bound is given the other equals
    it; with neither, both are 5 (vLLM's defaults).

    ``method`` ``draft_model``: ``model`` (a folder, ``.gguf`` or alias, as ``EngineConfig.model``)
    is a small model with the target's tokenizer that drafts greedily, with a KV pool of its own.

    Each decoding request gets up to ``num_speculative_tokens`` drafts per step, verified in one
    target step.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be a positive integer, "
                f"got {self.num_speculative_tokens!r}"
            )
        if self.method == NGRAM:
            self._settle_lookup_bounds()
            if self.model is not None:
                raise ValueError("speculative_config.model is for method 'draft_model', not 'ngram'")
        else:
            if not self.model:
                raise ValueError("speculative_config.model is required for method 'draft_model'")
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("speculative_config.prompt_lookup_min/max are for method 'ngram'")

    def _settle_lookup_bounds(self) -> None:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None and high is None:
            low = high = DEFAULT_PROMPT_LOOKUP
        elif low is None:
            low = high
        elif high is None:
            high = low
        assert low is not None and high is not None
        if not 1 <= low <= high:
            raise ValueError(
                f"speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {low} and {high}"
            )
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)

    @classmethod
    def from_value(cls, value: SpeculativeConfig | Mapping[str, Any] | str) -> SpeculativeConfig:
        """From a config, a dict (``LLM(speculative_config={...})``) or its JSON text (the flag)."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, Mapping):
            raise ValueError("speculative_config must be a JSON object such as "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs 'method' and 'num_speculative_tokens'")
        return cls(**value)
