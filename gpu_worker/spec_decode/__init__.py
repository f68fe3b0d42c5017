"""Speculative decoding (docs/SPEC_DECODE.md): proposers draft tokens when a step is planned, the
target verifies them all in that one step.

* :mod:`.config`: :class:`~.config.SpeculativeConfig` (``speculative_config``, vLLM's shape;
  torch-free);
* :mod:`.proposer`: the :class:`~.proposer.DraftProposer` interface; :mod:`.ngram` (prompt
  lookup, CPU only) and :mod:`.draft_model` (a small model with its own paged KV pool);
* :mod:`.rejection`: verification, greedy and by rejection sampling; :mod:`.verify_step`: the
  model runner's sampling for a step with drafts;
* :mod:`.factory`: the engine core's proposer for a config.

The scheduler's side (budgets, accepted-token accounting, counters) is
:mod:`gpu_worker.core.drafts`. Only :mod:`.config` is imported by the package itself, so the
engine configuration stays cheap to import.
"""

from gpu_worker.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
