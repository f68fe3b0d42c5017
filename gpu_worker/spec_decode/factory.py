"""The engine core's speculative-decoding pieces for an :class:`~gpu_worker.config.EngineConfig`.

Order at start-up (``EngineCore``): :func:`load_draft_runner` before the target's KV pool is sized
(so a profiled CUDA pool sees the draft's weights), :func:`share_kv_blocks` to split a KV byte
budget between the two pools, then :func:`make_proposer` once the pools' size is known.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.spec_decode.config import NGRAM
from gpu_worker.spec_decode.draft_model import DraftModelProposer
from gpu_worker.spec_decode.ngram import NgramProposer
from gpu_worker.spec_decode.proposer import DraftProposer, GrammarCheckedProposer, ValidateFn
from gpu_worker.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def load_draft_runner(
    config: EngineConfig, device: torch.device, dtype: torch.dtype, eos_token_ids: frozenset[int]
) -> ModelRunner | None:
    """The draft model in a runner of its own (no KV pool yet), on the engine core's device, one
    rank, the target's dtype and settings; None unless the method is ``draft_model``."""
    spec = config.speculative_config
    if spec is None or spec.method == NGRAM:
        return None
    from gpu_worker.executor.base import load_runner  # the executor package imports the engine's runner

    assert spec.model is not None  # checked by SpeculativeConfig
    draft_config = dataclasses.replace(
        config, model=spec.model, served_model_name=None, tokenizer=None, tensor_parallel_size=1,
        pipeline_parallel_size=1, speculative_config=None,
    )
    runner = load_runner(draft_config, device, dtype, eos_token_ids)
    logger.info("draft model %s loaded for speculative decoding (%d drafts per step)", spec.model,
                spec.num_speculative_tokens)
    return runner


def share_kv_blocks(
    config: EngineConfig, num_blocks: int, target: ModelRunner, draft: ModelRunner | None
) -> int:
    """Blocks of each pool when the target's and the draft's pools (same block count) share the
    KV budget the target alone would have had; an explicit ``num_kv_blocks`` is both pools' size."""
    if draft is None or config.num_kv_blocks is not None:
        return num_blocks
    # Both pools store the same element type, so the element size cancels out.
    target_bytes = target.kv_cache_spec.bytes_per_block(config.block_size, 1)
    draft_bytes = draft.kv_cache_spec.bytes_per_block(config.block_size, 1)
    return max(1, num_blocks * target_bytes // (target_bytes + draft_bytes))


def make_proposer(
    config: EngineConfig,
    draft: ModelRunner | None,
    num_kv_blocks: int,
    max_model_len: int,
    vocab_size: int,
    validate: ValidateFn,
) -> DraftProposer | None:
    """The proposer ``config.speculative_config`` asks for (None when speculation is off), its
    drafts cut by ``validate`` (the grammars of structured output); a draft model's KV pool is
    allocated here, ``num_kv_blocks`` blocks like the target's."""
    spec = config.speculative_config
    if spec is None:
        return None
    proposer: DraftProposer
    if spec.method == NGRAM:
        assert spec.prompt_lookup_min is not None and spec.prompt_lookup_max is not None
        proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
    else:
        assert draft is not None
        draft.initialize_kv_cache(num_kv_blocks, max_model_len)
        proposer = DraftModelProposer(draft, spec.num_speculative_tokens, config.model_name, vocab_size)
    return GrammarCheckedProposer(proposer, validate)
