"""The engine core in its own process (vLLM v1's ``EngineCoreProc``), and the parent's handle.

The child builds :class:`EngineCore` and loops on its own: it applies every command waiting
in its inbox (adds, aborts, queries, shutdown), runs one step, and sends **one**
:class:`StepResult` per loop (that step's outputs, a stats snapshot and the KV events) over a
pipe. So no Python work of the step shares a GIL with the server's event loop, and the
parent pays one unpickle per step instead of competing with the core for the GIL.

As in vLLM's ``EngineCoreProc``, the child's main thread only applies commands and steps: an
**input thread** moves commands from the inbox (unpickling them) into a local queue the loop
drains without blocking, and an **output thread** pickles each :class:`StepResult` and writes it
to the pipe, so both overlap the next step (torch and the wait for the sampled ids release the
GIL). The outputs travel as :class:`PackedOutputs` (a few flat columns, not one pickled
dataclass per request); the stats snapshot only when it matters (see :class:`_StatsGate`).

The parent (:class:`EngineCoreProc`) only sends commands and reads results; it never loads
the model weights (the tokenizer comes back pickled in the ready message). The child is
started with the ``spawn`` context so it may initialise CUDA; a spawned interpreter starts
with logging unconfigured, so the parent hands it its :class:`LogSettings` (level, text or
JSON) and the child's lines reach the shared stderr in the parent's format.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.core.kv_events import KVEvent
from gpu_worker.core.types import (
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    SchedulerStats,
    TokenLogprobs,
)
from llmserve.gc_tuning import freeze_startup_objects
from llmserve.telemetry.logging import LogSettings

logger = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_S = 10.0
_PARENT_CHECK_S = 1.0  # how often the child's input thread checks that its parent is alive
_STATS_INTERVAL_S = 0.05  # while stepping, the stats snapshot is sent at least this often


# ---------------------------------------------------------------------- messages (all picklable)


@dataclass(frozen=True)
class AddRequests:
    """Core requests of one user request: added all or none (``ValueError`` -> AddFailed)."""

    request_id: str
    core_requests: tuple[EngineCoreRequest, ...]


@dataclass(frozen=True)
class AbortRequests:
    core_ids: tuple[str, ...]


@dataclass(frozen=True)
class QueryCachedHashes:
    query_id: int


@dataclass(frozen=True)
class Shutdown:
    pass


Command = AddRequests | AbortRequests | QueryCachedHashes | Shutdown


@dataclass(frozen=True)
class AddFailed:
    request_id: str
    error: BaseException


@dataclass(frozen=True)
class PackedOutputs:
    """One step's :class:`EngineCoreOutput` list as flat columns (cheap to pickle).

    ``extras`` holds, sparsely, what most outputs lack: ``(row, new_logprobs, finish_reason,
    stop_token_id)`` for rows with logprobs, a finish reason or a stop token.
    """

    request_ids: list[str]
    new_token_ids: list[tuple[int, ...]]
    num_cached_tokens: list[int]
    extras: list[tuple[int, tuple[TokenLogprobs, ...], str | None, int | None]]

    @staticmethod
    def pack(outputs: list[EngineCoreOutput]) -> PackedOutputs:
        extras = [
            (row, o.new_logprobs, None if o.finish_reason is None else o.finish_reason.value, o.stop_token_id)
            for row, o in enumerate(outputs)
            if o.new_logprobs or o.finish_reason is not None or o.stop_token_id is not None
        ]
        return PackedOutputs(
            [o.request_id for o in outputs],
            [o.new_token_ids for o in outputs],
            [o.num_cached_tokens for o in outputs],
            extras,
        )

    def unpack(self) -> list[EngineCoreOutput]:
        outputs = [
            EngineCoreOutput(rid, tokens, num_cached_tokens=cached)
            for rid, tokens, cached in zip(
                self.request_ids, self.new_token_ids, self.num_cached_tokens, strict=True
            )
        ]
        for row, logprobs, reason, stop_token_id in self.extras:
            outputs[row] = EngineCoreOutput(
                self.request_ids[row],
                self.new_token_ids[row],
                new_logprobs=logprobs,
                finish_reason=FinishReason(reason) if reason is not None else None,
                num_cached_tokens=self.num_cached_tokens[row],
                stop_token_id=stop_token_id,
            )
        return outputs

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass(frozen=True)
class StepResult:
    """One loop of the child: what it applied, and the step's outputs if it stepped.

    ``stats`` is None when the snapshot was held back (the parent keeps its last one).
    """

    outputs: PackedOutputs | None
    stats: SchedulerStats | None
    kv_events: list[KVEvent]
    num_applied_adds: int  # core requests taken from the inbox by this loop
    failed_adds: list[AddFailed] = field(default_factory=list)
    replies: list[tuple[int, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Ready:
    config: EngineConfig  # the effective one (max_model_len filled in)
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    stats: SchedulerStats


@dataclass(frozen=True)
class Failed:
    """Start-up or a step raised: the child exits after sending this."""

    error: BaseException


# ---------------------------------------------------------------------- child


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(repr(exc))
    return exc


def run_engine_core(
    config: EngineConfig, inbox: Any, conn: Connection, log_settings: LogSettings | None = None
) -> None:
    """Child entry point: configure logging as the parent did (``log_settings``; None leaves it
    alone), build the core, report Ready (or Failed), then loop until Shutdown."""
    if log_settings is not None:
        log_settings.apply()
    from gpu_worker.engine.core import EngineCore  # torch and the model: child only

    try:
        core = EngineCore(config)
        core.warmup()
        conn.send(Ready(core.config, core.tokenizer, core.vocab_size, core.max_model_len,
                        tuple(core.eos_token_ids), core.stats()))
    except BaseException as exc:  # the parent re-raises it from from_config
        conn.send(Failed(_picklable(exc)))
        return
    commands: queue.Queue[Command] = queue.Queue()
    sends: queue.Queue[StepResult | Failed | None] = queue.Queue()  # None: no more
    threading.Thread(target=_read_commands, args=(inbox, commands), name="core-input", daemon=True).start()
    sender = threading.Thread(target=_send_results, args=(sends, conn), name="core-output", daemon=True)
    sender.start()
    freeze_startup_objects()  # the model and torch's objects: never walked by collections again
    try:
        _loop(core, commands, sends)
    except Exception as exc:  # a failed step: the parent fails every in-flight request
        logger.exception("engine core process failed")
        sends.put(Failed(_picklable(exc)))
    finally:
        sends.put(None)
        sender.join()  # everything queued reaches the pipe before the child exits


def _read_commands(inbox: Any, commands: queue.Queue[Command]) -> None:
    """Input thread: inbox -> ``commands`` until Shutdown (also queued if the parent died)."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            command: Command = inbox.get(timeout=_PARENT_CHECK_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # a killed parent must not leave the GPU held
                commands.put(Shutdown())
                return
            continue
        except (EOFError, OSError):
            commands.put(Shutdown())
            return
        commands.put(command)
        if isinstance(command, Shutdown):
            return


def _send_results(sends: queue.Queue[StepResult | Failed | None], conn: Connection) -> None:
    """Output thread: pickle and write each message, in order, until None."""
    while True:
        message = sends.get()
        if message is None:
            return
        try:
            conn.send(message)
        except (BrokenPipeError, OSError):  # the parent is gone: nothing to tell
            return


def _take_commands(commands: queue.Queue[Command], block: bool) -> list[Command]:
    taken: list[Command] = [commands.get()] if block else []
    while True:
        try:
            taken.append(commands.get_nowait())
        except queue.Empty:
            return taken


class _StatsGate:
    """Decides whether a loop's stats snapshot is sent: whenever the request counts change
    (or something was added, failed or queried), when the core goes idle (so the final state
    is always seen), and at least every ``_STATS_INTERVAL_S`` while stepping."""

    def __init__(self) -> None:
        self._last_key: tuple[int, int, int] | None = None
        self._last_sent = 0.0

    def should_send(self, stats: SchedulerStats, eventful: bool, idle: bool) -> bool:
        key = (stats.num_running, stats.num_waiting, stats.num_preemptions)
        now = time.monotonic()
        if eventful or idle or key != self._last_key or now - self._last_sent >= _STATS_INTERVAL_S:
            self._last_key, self._last_sent = key, now
            return True
        return False


def _loop(core: Any, commands: queue.Queue[Command], sends: queue.Queue[StepResult | Failed | None]) -> None:
    num_steps, step_time_s = 0, 0.0
    gate = _StatsGate()
    while True:
        taken = _take_commands(commands, block=not core.has_unfinished())
        failed: list[AddFailed] = []
        replies: list[tuple[int, Any]] = []
        num_adds = 0
        for command in taken:
            if isinstance(command, Shutdown):
                return
            if isinstance(command, AbortRequests):
                core.abort(command.core_ids)
            elif isinstance(command, QueryCachedHashes):
                replies.append((command.query_id, core.cached_block_hashes()))
            else:
                num_adds += len(command.core_requests)
                error = _add(core, command)
                if error is not None:
                    failed.append(AddFailed(command.request_id, error))
        outputs: PackedOutputs | None = None
        if core.has_unfinished():
            start = time.perf_counter()
            step_outputs = core.step()
            num_steps += 1
            step_time_s += time.perf_counter() - start
            if step_outputs:
                outputs = PackedOutputs.pack(step_outputs)
        snapshot = core.stats()
        stats: SchedulerStats | None = None
        if gate.should_send(snapshot, bool(num_adds or failed or replies), not core.has_unfinished()):
            extra = {"engine_steps": float(num_steps), "engine_step_time_s": step_time_s}
            stats = _with_extra(snapshot, extra)
        sends.put(StepResult(outputs, stats, core.take_kv_events(), num_adds, failed, replies))


def _add(core: Any, command: AddRequests) -> BaseException | None:
    added: list[str] = []
    try:
        for request in command.core_requests:
            core.add_request(request)
            added.append(request.request_id)
    except ValueError as exc:
        core.abort(added)
        return exc
    return None


def _with_extra(stats: SchedulerStats, extra: dict[str, float]) -> SchedulerStats:
    import dataclasses

    return dataclasses.replace(stats, extra={**stats.extra, **extra})


# ---------------------------------------------------------------------- parent


class EngineCoreProc:
    """The parent's handle on the child: start it, send commands, receive results.

    ``send`` is safe from any thread (a multiprocessing queue: its feeder thread writes, so
    the event loop never blocks on a full pipe). Exactly one thread calls ``recv``.
    """

    def __init__(self, config: EngineConfig) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._inbox: Any = ctx.Queue()
        self._conn, child_conn = ctx.Pipe(duplex=False)
        args = (config, self._inbox, child_conn, LogSettings.of_this_process())
        self._process = ctx.Process(target=run_engine_core, args=args, name="engine-core", daemon=True)
        self._process.start()
        child_conn.close()  # only the child holds the write end: its death reads as EOF here
        try:
            ready = self._conn.recv()
        except EOFError:
            self._process.join(_SHUTDOWN_TIMEOUT_S)
            raise RuntimeError(
                f"the engine core process exited during start-up (exit code {self._process.exitcode})"
            ) from None
        if isinstance(ready, Failed):
            self._process.join(_SHUTDOWN_TIMEOUT_S)
            raise ready.error
        self.ready: Ready = ready
        self.config = ready.config
        self.tokenizer = ready.tokenizer
        self.vocab_size = ready.vocab_size
        self.max_model_len = ready.max_model_len
        self.eos_token_ids = ready.eos_token_ids

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    def wait_exitcode(self, timeout_s: float = 5.0) -> int | None:
        """The child's exit code, waiting up to ``timeout_s`` for it to be reaped."""
        self._process.join(timeout_s)
        return self._process.exitcode

    def send(self, command: Command) -> None:
        self._inbox.put(command)

    def abort(self, core_ids: list[str]) -> None:
        self.send(AbortRequests(tuple(core_ids)))

    def recv(self) -> StepResult | Failed:
        """The child's next message; ``EOFError`` once it is gone."""
        message: StepResult | Failed = self._conn.recv()
        return message

    def join(self) -> None:
        """Ask the child to stop and wait for it (killing it if it does not stop)."""
        if self._process.is_alive():
            self.send(Shutdown())
            self._process.join(_SHUTDOWN_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._inbox.close()
        self._inbox.cancel_join_thread()  # the child is gone: nothing will read what is left
