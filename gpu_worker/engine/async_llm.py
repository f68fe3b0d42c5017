"""AsyncLLM: the asyncio front of the engine, with the engine core on its own thread.

Threads and ownership:

* the **core thread** owns the :class:`EngineCore` (scheduler, KV pool, model). It loops
  ``step()`` while there is work and sleeps on a condition when idle. Requests and aborts
  reach it through ``_inbox`` (a deque guarded by ``_wake``), applied between steps, so
  gRPC, tokenization and detokenization never stall a step;
* the **event loop** owns the :class:`InputProcessor` (tokenization, validation), the
  :class:`OutputProcessor` (detokenization, stop strings) and one ``asyncio.Queue`` per
  request. The core thread hands each step's outputs over with
  ``loop.call_soon_threadsafe``.

A step that raises fails every in-flight request with :class:`EngineDeadError` (never a
hang) and the engine refuses new work from then on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.core.kv_events import KVEvent
from gpu_worker.core.types import EngineCoreOutput, SchedulerStats
from gpu_worker.engine.core import EngineCore
from gpu_worker.engine.core_proc import EngineCoreProc
from gpu_worker.engine.errors import EngineClosedError, EngineDeadError, QueueFullError
from gpu_worker.engine.output_processor import OutputKind, OutputProcessor, merge_deltas
from gpu_worker.engine.processor import InputProcessor, ProcessedRequest, PromptType
from gpu_worker.outputs import RequestOutput
from gpu_worker.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Process-wide GIL switch interval set when an AsyncLLM starts (Python's default is 5 ms).
_GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class _Add:
    request: ProcessedRequest
    loop: asyncio.AbstractEventLoop

    @property
    def num_core_requests(self) -> int:
        return len(self.request.core_requests)


@dataclass(frozen=True)
class _Route:
    """Where a core request's outputs go: the event loop and the user request id."""

    loop: asyncio.AbstractEventLoop
    request_id: str


@dataclass(frozen=True)
class _Abort:
    core_ids: tuple[str, ...]
    num_core_requests = 0  # adds nothing to the queue


class AsyncLLM:
    """Streams DELTA :class:`RequestOutput`s per request from an engine core thread.

    Use from one event loop at a time. ``generate`` is an async generator: when its consumer
    lags behind the engine, the deltas waiting in its queue are merged into one output, so
    a slow stream costs one message per read, not one per engine step. Validation
    errors (``ValueError``), :class:`QueueFullError` and :class:`EngineClosedError` are
    raised by its first ``__anext__``; leaving it early (break, cancellation, ``aclose``)
    aborts the request in the core, which frees its KV blocks before the next step.
    """

    def __init__(self, core: EngineCore) -> None:
        self._core = core
        self._init_front(core)
        self._core_lock = threading.Lock()  # held by the core thread while it uses the core
        self._num_steps = 0  # core thread only, published in stats().extra
        self._step_time_s = 0.0  # time spent inside EngineCore.step (busy fraction = its rate)
        self._stats = self._snapshot()  # replaced (never mutated) by the core thread
        self._start_thread(self._run_core, "engine-core")

    def _init_front(self, core: EngineCore | EngineCoreProc) -> None:
        """The event-loop side and the state shared with the thread that feeds it."""
        self._tokenizer = core.tokenizer
        self._config = core.config  # the effective one (max_model_len filled in)
        self._processor = InputProcessor(
            core.tokenizer, core.vocab_size, core.max_model_len, core.eos_token_ids
        )
        self._outputs = OutputProcessor(core.tokenizer)  # event-loop side only
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}  # event-loop side
        self._wake = threading.Condition()  # guards _inbox, _num_queued_adds, _stopping
        self._inbox: deque[_Add | _Abort] = deque()
        self._num_queued_adds = 0  # core requests in _inbox not yet handed to the scheduler
        self._stopping = False
        self._closed = False  # no new requests (shutdown started)
        self._dead: BaseException | None = None  # set once a step failed
        self._events_lock = threading.Lock()
        self._kv_events: list[KVEvent] = []

    def _start_thread(self, target: Any, name: str) -> None:
        # Every torch call releases the GIL and must win it back from the event loop, which by
        # default waits out a 5 ms switch interval each time: W4 measured decode steps twice as
        # long as offline. A short interval keeps the core thread (the critical path) moving.
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        """Load the model and warm it up (blocking: call it from a worker thread if needed).

        With ``config.engine_core_process`` (default: on CUDA) the core runs in a child process
        (:class:`~gpu_worker.engine.async_llm_proc.AsyncLLMProc`), else on a thread of this one.
        """
        if _wants_core_process(config):
            from gpu_worker.engine.async_llm_proc import AsyncLLMProc

            return AsyncLLMProc(EngineCoreProc(config))
        core = EngineCore(config)
        core.warmup()
        return cls(core)

    # ------------------------------------------------------------------ properties

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def model_name(self) -> str:
        return self._config.model_name

    @property
    def max_model_len(self) -> int:
        return self._config.max_model_len or 0

    @property
    def block_size(self) -> int:
        return self._config.block_size

    @property
    def num_in_flight(self) -> int:
        """Requests whose stream is still open."""
        return len(self._queues)

    # ------------------------------------------------------------------ requests

    async def generate(
        self, prompt: PromptType, params: SamplingParams | None, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs as deltas; the last one has ``finished=True``."""
        self._check_accepting()
        processed = self._processor.process(request_id, prompt, params)
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        self._check_queue_room()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._outputs.add_request(processed, OutputKind.DELTA)
        self._queues[request_id] = queue
        self._send(_Add(processed, asyncio.get_running_loop()))
        finished = False
        error: BaseException | None = None  # found behind merged deltas: raised after them
        try:
            while not finished:
                item = error or await queue.get()
                if isinstance(item, BaseException):
                    raise item
                item, error = _coalesce(item, queue)
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_on_loop(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends with a ``finish_reason="abort"`` output."""
        final = self._abort_on_loop(request_id)
        queue = self._queues.get(request_id)
        if queue is not None and final is not None:
            queue.put_nowait(final)

    def _abort_on_loop(self, request_id: str) -> RequestOutput | None:
        core_ids, final = self._outputs.abort_request(request_id)
        if core_ids:
            self._send(_Abort(tuple(core_ids)))
        return final

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine core failed: {self._dead!r}")
        if self._closed:
            raise EngineClosedError("the engine is shut down")

    def _check_queue_room(self) -> None:
        with self._wake:
            waiting = self._stats.num_waiting + self._num_queued_adds
        if waiting >= self._config.max_queue_len:
            raise QueueFullError(
                f"{waiting} requests are waiting (max_queue_len {self._config.max_queue_len})"
            )

    def _send(self, command: _Add | _Abort) -> None:
        with self._wake:
            self._inbox.append(command)
            self._num_queued_adds += command.num_core_requests
            self._wake.notify()

    # ------------------------------------------------------------------ observability

    def stats(self) -> SchedulerStats:
        """Load as of the last step (a snapshot; safe from any thread).

        ``extra`` holds ``engine_steps`` and ``engine_step_time_s`` (cumulative seconds inside
        ``EngineCore.step``): their rate over wall time is how busy the core thread kept the device.
        """
        return self._stats

    def take_kv_events(self) -> list[KVEvent]:
        """KV block events since the last call (safe from any thread)."""
        with self._events_lock:
            events, self._kv_events = self._kv_events, []
        return events

    def cached_block_hashes(self) -> set[bytes]:
        """Every cached block hash; waits for the current step to end (rare: full resyncs)."""
        with self._core_lock:
            return self._core.cached_block_hashes()

    async def shutdown(self) -> None:
        """Refuse new requests, fail the open streams with EngineClosedError, stop the core thread."""
        self._close_streams()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _close_streams(self) -> None:
        self._closed = True
        for request_id, queue in list(self._queues.items()):
            self._abort_on_loop(request_id)
            queue.put_nowait(EngineClosedError("the engine shut down"))

    # ------------------------------------------------------------------ event-loop side of outputs

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        processed = self._outputs.process_outputs(outputs)
        for output in processed.request_outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        if processed.reqs_to_abort:  # ended by a stop string: free their KV blocks now
            self._send(_Abort(tuple(processed.reqs_to_abort)))

    def _on_error(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            self._outputs.abort_request(request_id)
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(error)

    # ------------------------------------------------------------------ core thread

    def _run_core(self) -> None:
        routes: dict[str, _Route] = {}  # core request id -> where its outputs go
        has_work = False
        while True:
            with self._wake:
                while not self._inbox and not has_work and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                commands = list(self._inbox)
                self._inbox.clear()
            with self._core_lock:
                try:
                    self._apply(commands, routes)
                    # Requests just added count as queued until this snapshot shows them waiting.
                    self._publish_state(num_applied_adds=sum(c.num_core_requests for c in commands))
                    if self._core.has_unfinished():
                        start = time.perf_counter()
                        outputs = self._core.step()
                        self._num_steps += 1
                        self._step_time_s += time.perf_counter() - start
                        self._publish_state()  # before the outputs: a consumer sees stats at least as new
                        self._dispatch(outputs, routes)
                    has_work = self._core.has_unfinished()
                except Exception as exc:  # a failed step must not leave streams hanging
                    logger.exception("engine core step failed; failing %d requests", len(routes))
                    self._die(exc, routes)
                    return

    def _apply(self, commands: list[_Add | _Abort], routes: dict[str, _Route]) -> None:
        for command in commands:
            if isinstance(command, _Abort):
                self._core.abort(command.core_ids)
                for core_id in command.core_ids:
                    routes.pop(core_id, None)
                continue
            added: list[str] = []
            try:
                for core_request in command.request.core_requests:
                    self._core.add_request(core_request)
                    added.append(core_request.request_id)
                    routes[core_request.request_id] = _Route(command.loop, command.request.request_id)
            except ValueError as exc:
                self._core.abort(added)
                for core_id in added:
                    routes.pop(core_id, None)
                self._post(command.loop, self._on_error, [command.request.request_id], exc)

    def _dispatch(self, outputs: list[EngineCoreOutput], routes: dict[str, _Route]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[EngineCoreOutput]] = {}
        for output in outputs:
            route = routes.get(output.request_id)
            if route is None:
                continue  # aborted by the front meanwhile
            if output.finished:
                del routes[output.request_id]
            by_loop.setdefault(route.loop, []).append(output)
        for loop, loop_outputs in by_loop.items():
            if not self._post(loop, self._on_outputs, loop_outputs):
                self._abort_in_core([o.request_id for o in loop_outputs])

    def _abort_in_core(self, core_ids: list[str]) -> None:
        self._core.abort(core_ids)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> bool:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def _snapshot(self) -> SchedulerStats:
        stats = self._core.stats()
        extra = {"engine_steps": float(self._num_steps), "engine_step_time_s": self._step_time_s}
        return dataclasses.replace(stats, extra={**stats.extra, **extra})

    def _publish_state(self, num_applied_adds: int = 0) -> None:
        stats = self._snapshot()
        with self._wake:
            self._stats = stats
            self._num_queued_adds -= num_applied_adds
        events = self._core.take_kv_events()
        if events:
            with self._events_lock:
                self._kv_events.extend(events)

    def _die(self, exc: BaseException, routes: dict[str, _Route]) -> None:
        self._dead = exc
        error = EngineDeadError(f"the engine core failed: {exc!r}")
        error.__cause__ = exc
        by_loop: dict[asyncio.AbstractEventLoop, list[str]] = {}
        for route in routes.values():
            by_loop.setdefault(route.loop, []).append(route.request_id)
        with self._wake:
            for command in self._inbox:
                if isinstance(command, _Add):
                    by_loop.setdefault(command.loop, []).append(command.request.request_id)
            self._inbox.clear()
        for loop, request_ids in by_loop.items():
            self._post(loop, self._on_error, sorted(set(request_ids)), error)


def _wants_core_process(config: EngineConfig) -> bool:
    """``engine_core_process``, or when unset (auto): whether the engine runs on CUDA."""
    if config.engine_core_process is not None:
        return config.engine_core_process
    if config.device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return config.device.startswith("cuda")


def _coalesce(
    first: RequestOutput, queue: asyncio.Queue[RequestOutput | BaseException]
) -> tuple[RequestOutput, BaseException | None]:
    """``first`` merged with the deltas already waiting behind it, and an error met there."""
    merged = first
    while not merged.finished and not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, BaseException):
            return merged, item
        merged = merge_deltas(merged, item)
    return merged, None
