"""llmserve's GPU worker: paged-KV engine, offline ``LLM`` API and gRPC worker service.

``from gpu_worker import LLM, SamplingParams`` works as in vLLM. Importing the package
stays cheap: the engine (and torch) load on first use of ``LLM``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gpu_worker.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from gpu_worker.config import EngineConfig
from gpu_worker.lora.request import LoRARequest
from gpu_worker.outputs import CompletionOutput, Logprob, RequestOutput
from gpu_worker.sampling_params import PluginCall, SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from gpu_worker.llm import LLM

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "EngineConfig",
    "Logprob",
    "LoRARequest",
    "PluginCall",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]

_LAZY = {"LLM": "gpu_worker.llm"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpu_worker' has no attribute {name!r}")
