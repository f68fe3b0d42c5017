"""Several ranks (tensor / pipeline parallel): rank 0 here, one spawned process per other device.

The engine core's process is the driver, global rank 0: it holds the scheduler and KV manager
(once, in the core) and its own model shard. :class:`MultiprocExecutor` spawns ranks
``1 .. world - 1`` (``torch.multiprocessing`` spawn, as vLLM's multiprocessing executor), each
loading only its shard, and every operation is a control message (:mod:`.control`) that all
ranks then perform together: profile and size the KV pool (the smallest answer wins), allocate
it, warm up and capture CUDA graphs, and run each step from its compact plan
(:mod:`.step_message`). The driver samples; the other ranks of its TP group receive the sampled
ids on the device (async scheduling's placeholders read them there).

A rank that dies cannot be recovered (its shard is gone): a watchdog thread notices its exit,
logs it and ends this process with a non-zero code, so the worker reports NOT_SERVING and its
orchestrator restarts it; nothing waits forever on a collective with a dead peer.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import threading
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.core.types import SchedulerOutput
from gpu_worker.distributed.launch import RankSetup, destroy, free_port, init_rank, rank_device
from gpu_worker.distributed.parallel_state import ParallelConfig
from gpu_worker.executor.base import Executor, load_runner, rank_num_kv_blocks
from gpu_worker.executor.control import DriverChannels, Op, RankChannel, pack_ints, unpack_ints
from gpu_worker.executor.step_message import decode_output, decode_step, encode_output, encode_step
from gpu_worker.worker.model_runner import ModelRunner, PendingRunnerOutput
from llmserve.telemetry.logging import LogSettings

logger = logging.getLogger(__name__)

RANK_DIED_EXIT_CODE = 70  # the process's code when a rank died (EX_SOFTWARE)
_JOIN_TIMEOUT_S = 10.0


class MultiprocExecutor(Executor):
    """Rank 0 in this process, the other ranks in spawned processes (see the module docstring)."""

    def __init__(
        self,
        config: EngineConfig,
        parallel: ParallelConfig,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: frozenset[int],
    ) -> None:
        port = config.distributed_port or free_port()
        init_method = f"tcp://127.0.0.1:{port}"
        ctx = multiprocessing.get_context("spawn")
        self._stopping = False
        self._procs = []
        conns = []
        for rank in range(1, parallel.world_size):
            setup = RankSetup(parallel, rank, init_method, rank_device(device, rank))
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=run_rank,
                args=(setup, config, dtype, eos_token_ids, theirs, LogSettings.of_this_process()),
                name=f"llmserve-rank-{rank}", daemon=True,
            )
            proc.start()
            theirs.close()
            self._procs.append(proc)
            conns.append(ours)
        self._control = DriverChannels(conns)
        self._watchdog = threading.Thread(target=self._watch, name="rank-watchdog", daemon=True)
        self._watchdog.start()
        logger.info(
            "tensor_parallel_size %d, pipeline_parallel_size %d: rank 0 here (pid %d), ranks %s, "
            "rendezvous %s", parallel.tensor_parallel_size, parallel.pipeline_parallel_size, os.getpid(),
            ", ".join(f"{rank} (pid {proc.pid})" for rank, proc in enumerate(self._procs, start=1)),
            init_method,
        )
        try:
            model_parallel, _ = init_rank(RankSetup(parallel, 0, init_method, rank_device(device, 0)))
            self.runner = load_runner(config, rank_device(device, 0), dtype, eos_token_ids, model_parallel)
        except BaseException:
            # A refused checkpoint (or any load error) raises here; the spawned ranks are ended
            # and the group left, so the caller can go on (an offline LLM(...) in a notebook) and
            # the watchdog does not end this process when they go.
            self._abandon()
            raise
        # The rank that samples: TP rank 0 of the last stage (the driver itself with one stage).
        self._sampler_rank = parallel.rank_of(0, parallel.pipeline_parallel_size - 1)
        self.pipeline_depth = parallel.pipeline_parallel_size

    def determine_num_kv_blocks(self, max_seq_len: int) -> int:
        self._control.send(Op.PROFILE, pack_ints(max_seq_len))
        blocks = rank_num_kv_blocks(self.runner, max_seq_len)
        replies = self._control.replies()  # (blocks, weight bytes) of every other rank
        self.total_weight_bytes = self.runner.weight_bytes + sum(r[1] for r in replies)
        return min([blocks, *(r[0] for r in replies)])

    def initialize_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        self._control.send(Op.INIT_KV, pack_ints(num_blocks, max_model_len))
        self.runner.initialize_kv_cache(num_blocks, max_model_len)

    def warmup(self) -> None:
        self._control.send(Op.WARMUP)
        self.runner.warmup()

    def execute_async(self, sched: SchedulerOutput) -> PendingRunnerOutput:
        self._control.send(Op.STEP, encode_step(sched))
        pending = self.runner.execute_async(sched)
        if self._sampler_rank == 0 or not self.runner.last_step_reports:
            return pending
        rank = self._sampler_rank
        return PendingRunnerOutput(lambda: decode_output(self._control.recv_from(rank)))

    def load_lora(self, slot: int, name: str, path: str) -> None:
        # This rank reads and checks the adapter first: a refused one never reaches the others. A
        # rank that then fails to read it (the files changed in between) ends, and the engine with it.
        self.runner.load_lora(slot, name, path)
        self._control.send(Op.LORA_LOAD, json.dumps({"slot": slot, "name": name, "path": path}).encode())

    def unload_lora(self, slot: int, name: str) -> None:
        self.runner.unload_lora(slot, name)
        self._control.send(Op.LORA_UNLOAD, json.dumps({"slot": slot, "name": name}).encode())

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        try:
            self._control.send(Op.SHUTDOWN)
        except OSError:  # a rank may be gone already
            logger.warning("could not tell every rank to stop", exc_info=True)
        for proc in self._procs:
            proc.join(_JOIN_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        destroy()

    def _abandon(self) -> None:
        """Stop the spawned ranks without telling them (they may still be loading), leave the group."""
        self._stopping = True
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(_JOIN_TIMEOUT_S)
        destroy()

    def _watch(self) -> None:
        """Ends this process when a rank dies (its shard is gone; collectives would hang)."""
        sentinels = {proc.sentinel: proc for proc in self._procs}
        while sentinels:
            for sentinel in wait(list(sentinels)):
                proc = sentinels.pop(sentinel)  # type: ignore[arg-type]
                proc.join()
                if self._stopping:
                    continue
                logger.critical(
                    "rank process %s (pid %s) exited with code %s: this engine cannot continue "
                    "without its shard; exiting with code %d so the worker is restarted",
                    proc.name, proc.pid, proc.exitcode, RANK_DIED_EXIT_CODE,
                )
                logging.shutdown()
                os._exit(RANK_DIED_EXIT_CODE)


def run_rank(
    setup: RankSetup,
    config: EngineConfig,
    dtype: torch.dtype,
    eos_token_ids: frozenset[int],
    conn: Connection,
    log_settings: LogSettings | None = None,
) -> None:
    """A spawned rank's entry point: join the group, load this rank's shard, then follow the
    driver's control messages until SHUTDOWN."""
    if log_settings is not None:
        log_settings.apply()
    parallel, _ = init_rank(setup)
    runner = load_runner(config, setup.device, dtype, eos_token_ids, parallel)
    logger.info("rank %d ready on %s (%s)", setup.rank, setup.device, runner.kv_cache_spec)
    serve_rank(runner, RankChannel(conn))
    destroy()


def serve_rank(runner: ModelRunner, control: RankChannel) -> None:
    """Perform the driver's operations in order until SHUTDOWN. A pipeline's sampling rank
    sends each step's result to the driver from a sender thread."""
    results: queue.SimpleQueue[PendingRunnerOutput | None] = queue.SimpleQueue()
    sender = None
    if runner.parallel.samples:
        sender = threading.Thread(
            target=_send_results, args=(results, control), name="rank-results", daemon=True
        )
        sender.start()

    def step(data: bytes) -> None:
        sched = decode_step(data)
        pending = runner.execute_async(sched)
        if sender is not None and runner.last_step_reports:
            results.put(pending)

    handlers: dict[Op, Any] = {
        Op.PROFILE: lambda data: control.reply(
            pack_ints(rank_num_kv_blocks(runner, unpack_ints(data)[0]), runner.weight_bytes)
        ),
        Op.INIT_KV: lambda data: runner.initialize_kv_cache(*unpack_ints(data)),
        Op.WARMUP: lambda data: runner.warmup(),
        Op.STEP: step,
        Op.LORA_LOAD: lambda data: runner.load_lora(**json.loads(data)),
        Op.LORA_UNLOAD: lambda data: runner.unload_lora(**json.loads(data)),
    }
    try:
        while True:
            op, data = control.recv()
            if op is Op.SHUTDOWN:
                return
            handlers[op](data)
    finally:
        if sender is not None:
            results.put(None)
            sender.join()


def _send_results(results: queue.SimpleQueue[PendingRunnerOutput | None], control: RankChannel) -> None:
    while (pending := results.get()) is not None:
        control.reply(encode_output(pending.result()))
