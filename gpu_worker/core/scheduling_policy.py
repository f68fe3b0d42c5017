"""Scheduling policies: which waiting request is admitted first, which running one is preempted.

A policy ranks requests; the :class:`~gpu_worker.core.scheduler.Scheduler` applies the ranks
with fixed rules, so every policy keeps its invariants (no starvation of the head by blocks,
progress under preemption):

* waiting requests are admitted in rank order, first come, first served among equal ranks;
* running requests are served in rank order (admission order among equal ranks), and under KV
  pressure the last of that order is preempted: the worst-ranked, most recently admitted one;
* a preempted request resumes before a waiting one unless the waiting one ranks strictly better.

``fcfs`` (the default) ranks every request the same, which is arrival order; ``priority`` ranks
by the request's ``priority`` (lower runs first, as in vLLM). More policies come from installed
packages through the entry-point group ``llmserve.scheduling_policies`` (docs/PLUGINS.md). Pure
Python: the scheduler must not import torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from gpu_worker.sampling_params import SamplingParams


class RankedRequest(Protocol):
    """What a policy may read of a request (fields fixed for the request's lifetime)."""

    request_id: str
    priority: int
    arrival_time: float
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


class SchedulingPolicy(ABC):
    """Ranks requests for the scheduler: a lower rank runs first and is preempted last.

    ``rank`` is called once per request, when it is queued; it must depend only on the
    request's fixed fields (above) and return values that compare with each other (numbers,
    or tuples of numbers). One policy instance serves one engine; the scheduler calls it from
    the engine-core thread only.
    """

    name: str = ""

    @abstractmethod
    def rank(self, request: RankedRequest) -> float | tuple[float, ...]:
        """The request's rank: lower runs first."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: every request has the same rank (``priority`` is ignored)."""

    name = "fcfs"

    def rank(self, request: RankedRequest) -> float:
        return 0


class PriorityPolicy(SchedulingPolicy):
    """By ``priority`` (lower runs first, as in vLLM); first come, first served among equals."""

    name = "priority"

    def rank(self, request: RankedRequest) -> float:
        return request.priority


BUILTIN_POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}
