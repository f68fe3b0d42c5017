"""fp8 KV-cache scales computed from the first real forward (``EngineConfig.calculate_kv_scales``).

vLLM's ``--calculate-kv-scales``: where the checkpoint has no ``k_scale``/``v_scale`` for a layer,
the runner's first real step (never a profile or warm-up step, never a CUDA-graph replay or
capture) computes them from the K/V that step stores, per layer and per tensor
(``PagedAttention.calibrate_kv_scales``), and they are frozen for the life of the engine. Every
rank does this for its own layers (a pipeline stage) and KV heads (tensor parallel); a draft
model's runner for its own layers. The first real step always carries prompt tokens: no request
has K/V before it, so nothing in the cache (prefix-cache hits included) predates the scales.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from gpu_worker.model_executor.layers.attention import PagedAttention, param_of

logger = logging.getLogger(__name__)


def kv_scales_source(layers: list[PagedAttention]) -> str:
    """Where ``layers``' scales come from: ``checkpoint``, ``computed``, ``default`` (1.0), or
    ``mixed`` (per scale and layer, e.g. a checkpoint that has them for some layers)."""
    sources = {s for layer in layers for s in layer.scale_sources.values()}
    return sources.pop() if len(sources) == 1 else "mixed" if sources else "default"


class KVScaleCalibration:
    """The attention layers whose scales the first real forward computes (none once it ran)."""

    def __init__(self, model: nn.Module, kv_fp8: bool, calculate: bool) -> None:
        """``kv_fp8``: the KV cache is e4m3; ``calculate``: ``calculate_kv_scales``. Layers whose
        checkpoint set both scales are left out (a checkpoint's scales are never overwritten).
        Logs where an fp8 cache's scales come from."""
        self.layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        self._pending = tuple(
            layer for layer in self.layers
            if kv_fp8 and calculate and any(source != "checkpoint" for source in layer.scale_sources.values())
        )
        if kv_fp8:
            logger.info("fp8 KV cache scales: %s", self.describe())

    @property
    def pending(self) -> bool:
        """Whether the next real forward computes scales (it must then run eagerly)."""
        return bool(self._pending)

    def describe(self) -> str:
        """Where the scales come from, for the start log (``default`` is 1.0)."""
        if self.pending:
            kept = len(self.layers) - len(self._pending)
            return (f"computed from the first prefill for {len(self._pending)} of {len(self.layers)} layers"
                    + (f" ({kept} from the checkpoint)" if kept else ""))
        source = kv_scales_source(self.layers)
        return "1.0 (calculate_kv_scales off)" if source == "default" else source

    @contextmanager
    def rehearsal(self) -> Iterator[None]:
        """Around a warm-up forward that takes the first real forward's path (eager, unfused
        rotary and store, the amax) so its kernels compile before the first request, not in its
        time to first token; the scales, their sources and :attr:`pending` are restored after."""
        saved = [(layer, dict(layer.scale_sources),
                  {n: param_of(layer, n).clone() for n in ("k_scale", "v_scale")}) for layer in self._pending]
        for layer, _, _ in saved:
            layer.calibrate = True
        try:
            yield
        finally:
            for layer, sources, values in saved:
                layer.calibrate = False
                layer.scale_sources.update(sources)
                for name, value in values.items():
                    param_of(layer, name).copy_(value)  # in place: graphs read these addresses

    @contextmanager
    def first_forward(self) -> Iterator[None]:
        """Around the first real forward: its attention layers compute their scales from the K/V
        they store, before storing it; frozen afterwards, whatever the forward did."""
        layers, self._pending = self._pending, ()
        for layer in layers:
            layer.calibrate = True
        try:
            yield
        finally:
            for layer in layers:
                layer.calibrate = False
            if layers and logger.isEnabledFor(logging.INFO):  # one host sync, once
                ks = [v for layer in layers for v in param_of(layer, "k_scale").tolist()]
                vs = [v for layer in layers for v in param_of(layer, "v_scale").tolist()]
                logger.info(
                    "fp8 KV cache scales computed from the first prefill for %d layers (frozen): "
                    "k_scale %.4g..%.4g, v_scale %.4g..%.4g", len(layers), min(ks), max(ks), min(vs), max(vs),
                )
