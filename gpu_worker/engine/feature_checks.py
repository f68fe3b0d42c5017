"""Front-side checks of a request's structured output and plug-ins (before the core sees it).

A format that does not parse, a plug-in name that is not installed, or arguments a plug-in
refuses are ``ValueError``s naming the field, which the servers report as INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from gpu_worker.plugins.interfaces import LogitsProcessor, StoppingCriterion
from gpu_worker.plugins.registry import (
    PluginRegistry,
    logits_processor_registry,
    stopping_criterion_registry,
)
from gpu_worker.sampling_params import PluginCall, SamplingParams, StructuredOutputsParams
from gpu_worker.structured.grammar import check_syntax  # imports xgrammar on its first call

_CHECKED_FORMATS = 1024  # formats remembered as valid (LRU): a repeated schema is parsed once


class FeatureChecks:
    """Checks structured output (xgrammar syntax) and plug-in calls of sampling params."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._valid_formats: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._processors: PluginRegistry[LogitsProcessor] | None = None
        self._criteria: PluginRegistry[StoppingCriterion] | None = None

    def check(self, params: SamplingParams) -> None:
        """``ValueError`` naming the problem, or None when the request may run."""
        if params.structured_output is not None:
            self._check_format(params)
        if params.logits_processors:
            if self._processors is None:
                self._processors = logits_processor_registry()
            _check_calls("logits_processors", params.logits_processors, self._processors)
        if params.stopping_criteria:
            if self._criteria is None:
                self._criteria = stopping_criterion_registry()
            _check_calls("stopping_criteria", params.stopping_criteria, self._criteria)

    def unchecked_format(self, params: SamplingParams | None) -> StructuredOutputsParams | None:
        """The request's format when its syntax is still to be parsed (None: no format, a format
        parsed before, or no tokenizer, which :meth:`check` refuses at once). An async front
        parses it off its event loop (:func:`check_syntax`), notes it with :meth:`note_valid`,
        and :meth:`check` then finds it parsed."""
        spec = params.structured_output if params is not None else None
        if spec is None or self.tokenizer is None or spec.key in self._valid_formats:
            return None
        return spec

    def note_valid(self, spec: StructuredOutputsParams) -> None:
        """``spec`` parsed: later requests with the same format skip the parse."""
        self._valid_formats[spec.key] = None
        self._valid_formats.move_to_end(spec.key)
        if len(self._valid_formats) > _CHECKED_FORMATS:
            self._valid_formats.popitem(last=False)

    def _check_format(self, params: SamplingParams) -> None:
        spec = params.structured_output
        assert spec is not None
        if self.tokenizer is None:
            raise ValueError("structured_output: this model has no tokenizer")
        if spec.key in self._valid_formats:
            self._valid_formats.move_to_end(spec.key)
            return
        check_syntax(spec)
        self.note_valid(spec)

def _check_calls(field: str, calls: list[PluginCall], registry: PluginRegistry[Any]) -> None:
    for call in calls:
        try:
            registry.get(call.name).validate_args(call.args)
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
