"""AsyncLLMProc: :class:`AsyncLLM` with the engine core in a child process.

Same contract as :class:`AsyncLLM` (streams, aborts, errors, stats). What changes is who
feeds the event loop: the event loop sends adds and aborts straight to the child (a
multiprocessing queue), and a **reader thread** receives one :class:`StepResult` per engine
step and hands its outputs to the event loop in one callback. The parent keeps the tokenizer,
input and output processing, and never loads the model.

The child dying (a failed step, a crash, a kill) fails every in-flight request with
:class:`EngineDeadError`; nothing hangs.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import Future
from typing import Any

from gpu_worker.core.types import EngineCoreOutput
from gpu_worker.engine.async_llm import AsyncLLM, _Abort, _Add, _Route
from gpu_worker.engine.core_proc import (
    AbortRequests,
    AddRequests,
    EngineCoreProc,
    Failed,
    QueryCachedHashes,
    StepResult,
)
from gpu_worker.engine.errors import EngineDeadError

_QUERY_TIMEOUT_S = 60.0


class AsyncLLMProc(AsyncLLM):
    """Streams DELTA outputs from an engine core running in ``proc``'s child process."""

    def __init__(self, proc: EngineCoreProc) -> None:
        # Not super().__init__: that one starts a core thread on an in-process EngineCore.
        self._proc = proc
        self._init_front(proc)
        # Routes are written by the event loop (adds, aborts) and read by the reader thread.
        self._routes_lock = threading.Lock()  # guards _routes, _queries, and setting _dead
        self._routes: dict[str, _Route] = {}
        self._queries: dict[int, Future[Any]] = {}
        self._query_ids = itertools.count()
        self._stats = proc.ready.stats
        self._start_thread(self._run_reader, "engine-core-reader")

    # ------------------------------------------------------------------ event-loop side

    def _send(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            with self._routes_lock:
                for core_id in command.core_ids:
                    self._routes.pop(core_id, None)
            self._proc.send(AbortRequests(command.core_ids))
            return
        request = command.request
        with self._routes_lock:
            dead = self._dead
            if dead is None:
                for core_request in request.core_requests:
                    self._routes[core_request.request_id] = _Route(command.loop, request.request_id)
        if dead is not None:  # died between the admission check and here
            self._post(command.loop, self._on_error, [request.request_id], _dead_error(dead))
            return
        with self._wake:
            self._num_queued_adds += command.num_core_requests
        self._proc.send(AddRequests(request.request_id, tuple(request.core_requests)))

    def _abort_in_core(self, core_ids: list[str]) -> None:
        self._proc.abort(core_ids)

    def cached_block_hashes(self) -> set[bytes]:
        """Every cached block hash, asked of the child (waits for its current step to end)."""
        future: Future[Any] = Future()
        with self._routes_lock:
            if self._dead is not None:
                raise _dead_error(self._dead)
            query_id = next(self._query_ids)
            self._queries[query_id] = future
        self._proc.send(QueryCachedHashes(query_id))
        hashes: set[bytes] = future.result(timeout=_QUERY_TIMEOUT_S)
        return hashes

    async def shutdown(self) -> None:
        """Refuse new requests, fail the open streams, stop the child and the reader thread."""
        self._close_streams()
        self._stopping = True  # the reader reads the child's exit as a shutdown, not a death
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._proc.join)
        await loop.run_in_executor(None, self._thread.join)

    # ------------------------------------------------------------------ reader thread

    def _run_reader(self) -> None:
        while True:
            try:
                message = self._proc.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    code = self._proc.wait_exitcode()
                    self._die_proc(RuntimeError(f"the engine core process died (exit code {code})"))
                return
            if isinstance(message, Failed):
                self._die_proc(message.error)
                return
            self._on_step(message)

    def _on_step(self, result: StepResult) -> None:
        with self._wake:  # before the outputs: a consumer sees stats at least as new
            if result.stats is not None:  # None: the child held an unchanged snapshot back
                self._stats = result.stats
            self._num_queued_adds -= result.num_applied_adds
        if result.kv_events:
            with self._events_lock:
                self._kv_events.extend(result.kv_events)
        for failed in result.failed_adds:
            self._fail_add(failed.request_id, failed.error)
        for query_id, value in result.replies:
            with self._routes_lock:
                future = self._queries.pop(query_id, None)
            if future is not None:
                future.set_result(value)
        if result.outputs:
            self._deliver(result.outputs.unpack())

    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        with self._routes_lock:
            self._dispatch(outputs, self._routes)

    def _fail_add(self, request_id: str, error: BaseException) -> None:
        with self._routes_lock:
            core_ids = [cid for cid, route in self._routes.items() if route.request_id == request_id]
            routes = [self._routes.pop(cid) for cid in core_ids]
        if routes:
            self._post(routes[0].loop, self._on_error, [request_id], error)

    def _die_proc(self, exc: BaseException) -> None:
        with self._routes_lock:
            self._dead = exc
            routes, self._routes = self._routes, {}
            queries, self._queries = self._queries, {}
        for future in queries.values():
            future.set_exception(_dead_error(exc))
        self._die(exc, routes)


def _dead_error(exc: BaseException) -> EngineDeadError:
    error = EngineDeadError(f"the engine core failed: {exc!r}")
    error.__cause__ = exc
    return error
