"""Fixtures of the runner/sampler tests: runners on the tiny models (``tiny_model``, tests/conftest.py)
and a minimal scheduler stand-in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpu_worker.core.types import RunnerOutput, ScheduledRequest, SchedulerOutput
from gpu_worker.model_executor import loader
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker.model_runner import ModelRunner
from tests.helpers.runners import build_runner
from tests.helpers.torch_threads import _one_torch_thread  # noqa: F401 - autouse fixture


@pytest.fixture(scope="session")
def smollm2_source(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> loader.ModelSource:
    """The SmolLM2 GGUF converted into a session cache (shared path with the loader tests: one conversion)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMSERVE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "llmserve-cache"))
        return loader.resolve_model(str(smollm2_gguf))


def make_runner(model_dir: Path, *, num_kv_blocks: int = 96, block_size: int = 4, **kw: Any) -> ModelRunner:
    """A CPU float32 runner for ``model_dir``."""
    return build_runner(model_dir, num_kv_blocks=num_kv_blocks, block_size=block_size, **kw)


@dataclass
class _Seq:
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    started: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Driver:
    """A minimal scheduler stand-in: shuffled block ids, per-step token budgets, greedy feedback."""

    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner = runner
        self.bs = runner.block_size
        self.free = list(np.random.default_rng(seed).permutation(runner.num_kv_blocks).tolist())
        self.seqs: dict[str, _Seq] = {}
        self.logprobs: dict[str, list[Any]] = {}

    def add(self, req_id: str, prompt: list[int], params: SamplingParams | None = None) -> None:
        self.seqs[req_id] = _Seq(list(prompt), params or SamplingParams(temperature=0.0, max_tokens=64))
        self.logprobs[req_id] = []

    def step(
        self,
        budget: dict[str, int] | None = None,
        finished: frozenset[str] = frozenset(),
        preempted: frozenset[str] = frozenset(),
    ) -> RunnerOutput:
        """Schedule every live request (``budget[req_id]`` tokens at most; 0 skips it)."""
        for req_id in finished | preempted:
            seq = self.seqs[req_id]
            self.free.extend(seq.blocks)
            seq.blocks, seq.computed, seq.started = [], 0, False
            if req_id in finished:
                del self.seqs[req_id]
        scheduled = []
        for req_id, seq in self.seqs.items():
            n = len(seq.tokens) - seq.computed
            if budget is not None:
                n = min(n, budget.get(req_id, n))
            if n <= 0:
                continue
            end = seq.computed + n
            need = -(-end // self.bs) - len(seq.blocks)
            new_blocks = [self.free.pop() for _ in range(max(0, need))]
            seq.blocks += new_blocks
            is_new = not seq.started
            scheduled.append(
                ScheduledRequest(
                    req_id=req_id,
                    token_ids=tuple(seq.tokens[seq.computed : end]),
                    start_pos=seq.computed,
                    block_ids=tuple(seq.blocks if is_new else new_blocks),
                    sample=end == len(seq.tokens),
                    is_new=is_new,
                    params=seq.params if is_new else None,
                    prompt_len=len(seq.prompt),
                    output_token_ids=tuple(seq.output) if is_new else (),
                )
            )
            seq.started, seq.computed = True, end
        out = self.runner.execute(
            SchedulerOutput(
                requests=tuple(scheduled),
                num_scheduled_tokens=sum(len(r.token_ids) for r in scheduled),
                finished_req_ids=finished,
                preempted_req_ids=preempted,
            )
        )
        for i, (req_id, tok) in enumerate(zip(out.req_ids, out.sampled_token_ids, strict=True)):
            self.seqs[req_id].output.append(tok)
            if out.logprobs:
                self.logprobs[req_id].append(out.logprobs[i])
        return out

    def run(self, steps: int, budget: dict[str, int] | None = None) -> None:
        for _ in range(steps):
            self.step(budget)


@pytest.fixture
def driver_cls() -> type[Driver]:
    return Driver


@pytest.fixture
def runner_factory() -> Callable[..., ModelRunner]:
    return make_runner


def capture_logits(runner: ModelRunner) -> list[torch.Tensor]:
    """Record the logits every step samples from (a spy on the sampler's two entries, ``sample``
    and the plain greedy ``greedy``, which ``sample`` itself may call: one record per step).
    The sampler, not ``compute_logits``: a graphed decode step runs the LM head inside its
    CUDA graph."""
    captured: list[torch.Tensor] = []
    sampler = runner.sampler
    inside = [False]

    def spying(fn: Any) -> Any:
        def spy(logits: torch.Tensor, *args: Any) -> Any:
            if inside[0]:
                return fn(logits, *args)
            captured.append(logits.clone())
            inside[0] = True
            try:
                return fn(logits, *args)
            finally:
                inside[0] = False
        return spy

    sampler.sample = spying(sampler.sample)  # type: ignore[method-assign]
    sampler.greedy = spying(sampler.greedy)  # type: ignore[method-assign]
    return captured


@pytest.fixture
def logits_spy() -> Callable[[ModelRunner], list[torch.Tensor]]:
    return capture_logits
