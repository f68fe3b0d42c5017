"""One rank: the runner in the engine core's own process (today's single-GPU engine, no cost)."""

from __future__ import annotations

from gpu_worker.core.types import SchedulerOutput
from gpu_worker.executor.base import Executor, rank_num_kv_blocks
from gpu_worker.worker.model_runner import ModelRunner, PendingRunnerOutput


class UniProcExecutor(Executor):
    """Calls ``runner`` directly."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def determine_num_kv_blocks(self, max_seq_len: int) -> int:
        return rank_num_kv_blocks(self.runner, max_seq_len)

    def initialize_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.runner.initialize_kv_cache(num_blocks, max_model_len)

    def warmup(self) -> None:
        self.runner.warmup()

    def execute_async(self, sched: SchedulerOutput) -> PendingRunnerOutput:
        return self.runner.execute_async(sched)
