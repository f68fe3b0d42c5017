"""The interfaces a plug-in implements: :class:`LogitsProcessor` and :class:`StoppingCriterion`
(and :class:`~gpu_worker.core.scheduling_policy.SchedulingPolicy`, which lives with the
scheduler because the scheduler must not import torch)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ProcessorRow:
    """One request's row in a :class:`LogitsProcessor` call."""

    args: Any  # the request's JSON arguments for this processor (validated by validate_args)
    output_token_ids: Sequence[int]  # the tokens it generated so far, oldest first
    prompt_len: int  # tokens in its prompt


class LogitsProcessor(ABC):
    """Changes the logits of the requests that name it, batched: one call per step for all of them.

    One instance per model runner, built lazily with the vocabulary size and the device. Each
    step, the rows of the requests that listed this processor (in their listed order, after
    penalties and before the structured-output mask and temperature) are gathered into
    ``logits`` ``[len(rows), vocab]`` (float32, on the device); the returned tensor of the same
    shape replaces them. Keep the work on the device batched; loop over ``rows`` only to build
    small index tensors. Setting a logit to ``-inf`` forbids a token.
    """

    name: str = ""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device

    @classmethod
    def validate_args(cls, args: Any) -> None:
        """Raise ``ValueError`` (the request is INVALID_ARGUMENT) when ``args`` do not fit.
        Called by the front for each request before it is queued; accepts anything by default."""
        return None

    @abstractmethod
    def __call__(self, logits: torch.Tensor, rows: Sequence[ProcessorRow]) -> torch.Tensor:
        """The processed logits of ``rows`` (in place or a new tensor)."""


class StoppingCriterion(ABC):
    """Decides when a sequence ends, after each of its tokens.

    One instance per sequence (``n > 1`` gives each sample its own), built with the request's
    JSON ``args``; called by the serving front after every new token with the sequence's
    tokens and text so far. Returning True ends the sequence after this token with
    ``finish_reason="stop"`` and ``stop_reason`` = the criterion's entry-point name. Runs on the
    front's event loop: keep it cheap (it sees each token once).
    """

    name: str = ""

    def __init__(self, args: Any) -> None:
        self.args = args

    @classmethod
    def validate_args(cls, args: Any) -> None:
        """Raise ``ValueError`` (the request is INVALID_ARGUMENT) when ``args`` do not fit;
        accepts anything by default."""
        return None

    @abstractmethod
    def __call__(self, token_ids: Sequence[int], text: str) -> bool:
        """True to end the sequence after its last token."""
