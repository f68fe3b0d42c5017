"""Plug-ins: logits processors, stopping criteria and scheduling policies from installed packages.

A package registers its classes under the entry-point groups below (``pyproject.toml``)::

    [project.entry-points."llmserve.logits_processors"]
    ban_tokens = "my_pkg.processors:BanTokens"

Requests name logits processors and stopping criteria with JSON arguments
(``SamplingParams(logits_processors=[{"name": "ban_tokens", "args": [42]}])``); the worker
flag ``--scheduling-policy NAME`` picks a policy. Only installed entry points are ever looked
up: a name that is not installed is INVALID_ARGUMENT, and nothing is imported or evaluated
from request data. docs/PLUGINS.md has the interfaces and an example package.
"""

from gpu_worker.core.scheduling_policy import FCFSPolicy, PriorityPolicy, RankedRequest, SchedulingPolicy
from gpu_worker.plugins.interfaces import LogitsProcessor, ProcessorRow, StoppingCriterion
from gpu_worker.plugins.registry import (
    LOGITS_PROCESSORS,
    SCHEDULING_POLICIES,
    STOPPING_CRITERIA,
    PluginRegistry,
    logits_processor_registry,
    scheduling_policy_registry,
    stopping_criterion_registry,
)

__all__ = [
    "LOGITS_PROCESSORS",
    "SCHEDULING_POLICIES",
    "STOPPING_CRITERIA",
    "FCFSPolicy",
    "LogitsProcessor",
    "PluginRegistry",
    "PriorityPolicy",
    "ProcessorRow",
    "RankedRequest",
    "SchedulingPolicy",
    "StoppingCriterion",
    "logits_processor_registry",
    "scheduling_policy_registry",
    "stopping_criterion_registry",
]
