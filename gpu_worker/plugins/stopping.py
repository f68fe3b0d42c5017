"""The front's use of stopping criteria: one :class:`SampleCriteria` per sequence."""

from __future__ import annotations

from collections.abc import Sequence

from gpu_worker.plugins.interfaces import StoppingCriterion
from gpu_worker.plugins.registry import PluginRegistry
from gpu_worker.sampling_params import PluginCall


class SampleCriteria:
    """The stopping criteria one sequence named, each its own instance (they may keep state)."""

    def __init__(self, calls: Sequence[PluginCall], registry: PluginRegistry[StoppingCriterion]) -> None:
        self._criteria = [(call.name, registry.get(call.name)(call.args)) for call in calls]

    def check(self, token_ids: Sequence[int], text: str) -> str | None:
        """The name of the first criterion that ends the sequence after its last token, or None."""
        for name, criterion in self._criteria:
            if criterion(token_ids, text):
                return name
        return None
