"""The sampler's logits-processing stage: plug-in logits processors, then the grammar mask.

:meth:`LogitsProcessing.attach` adds this step's stages to the :class:`SamplingMetadata`; the
sampler runs them after penalties, before temperature and truncation (raw logprobs are taken
before any of it). Each stage is batched: a plug-in gets all its rows in one call (one gather,
one scatter), the grammar mask is one kernel over the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from gpu_worker.core.types import GrammarBitmask
from gpu_worker.plugins.interfaces import LogitsProcessor, ProcessorRow
from gpu_worker.plugins.registry import PluginRegistry, logits_processor_registry
from gpu_worker.structured.bitmask import GrammarMask
from gpu_worker.worker.request_state import RequestStates
from gpu_worker.worker.sampler import SamplingMetadata

LogitsStage = Callable[[torch.Tensor], torch.Tensor]


class LogitsProcessing:
    """Builds a step's logits stages; owns the plug-in processor instances (one per name)."""

    def __init__(self, vocab_size: int, device: torch.device,
                 registry: PluginRegistry[LogitsProcessor] | None = None) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._registry = registry
        self._processors: dict[str, LogitsProcessor] = {}

    def attach(
        self,
        md: SamplingMetadata,
        states: RequestStates,
        rows: np.ndarray,
        req_ids: tuple[str, ...],
        grammar: GrammarBitmask | None,
    ) -> SamplingMetadata:
        """``md`` with the stages of the sampled ``rows`` (state rows, in batch order). Plug-in
        rows read their output tokens from ``states``: the caller has recorded every earlier
        step's sampled token first (``states.needs_history``)."""
        stages: list[LogitsStage] = []
        if states.has_logits_processors[rows].any():
            stages.extend(self._plugin_stages(states, rows))
        if grammar is not None:
            row_of: dict[str, int] = {}
            for i, rid in enumerate(req_ids):  # speculative decoding: a row per position, from here
                row_of.setdefault(rid, i)
            stages.append(GrammarMask(grammar, row_of, len(req_ids), self.device))
        if not stages:
            return md
        return dataclasses.replace(md, logits_stages=tuple(stages))

    def _plugin_stages(self, states: RequestStates, rows: np.ndarray) -> list[LogitsStage]:
        # Position p of every request's list is one round, so each request gets its processors
        # in the order it listed them; within a round, one call per processor name.
        calls = {}
        for i in np.flatnonzero(states.has_logits_processors[rows]).tolist():
            rs = states.sampling[rows[i]]
            assert rs is not None
            calls[i] = rs.params.logits_processors
        stages: list[LogitsStage] = []
        for position in range(max(len(c) for c in calls.values())):
            by_name: dict[str, tuple[list[int], list[ProcessorRow]]] = {}
            for i, plugin_calls in calls.items():
                if position < len(plugin_calls):
                    call = plugin_calls[position]
                    row = int(rows[i])
                    n_tok, prompt_len = int(states.num_tokens[row]), int(states.prompt_len[row])
                    outputs = states.token_ids[row, prompt_len:n_tok].tolist()
                    entry = ProcessorRow(call.args, outputs, prompt_len)
                    idx, batch = by_name.setdefault(call.name, ([], []))
                    idx.append(i)
                    batch.append(entry)
            for name, (idx, batch) in by_name.items():
                stages.append(_PluginStage(self._processor(name), idx, batch, self.device))
        return stages

    def _processor(self, name: str) -> LogitsProcessor:
        processor = self._processors.get(name)
        if processor is None:
            if self._registry is None:
                self._registry = logits_processor_registry()
            processor = self._registry.get(name)(self.vocab_size, self.device)
            self._processors[name] = processor
        return processor


class _PluginStage:
    """One processor over its rows: gather, call, scatter back."""

    def __init__(self, processor: LogitsProcessor, idx: list[int], rows: list[ProcessorRow],
                 device: torch.device) -> None:
        self.processor = processor
        self.index = torch.tensor(idx, dtype=torch.int64, device=device)
        self.rows = rows

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        processed = self.processor(logits.index_select(0, self.index), self.rows)
        return logits.index_copy(0, self.index, processed.to(logits.dtype))
