"""How the serving front talks to the engine core: one interface, two placements (vLLM's
``core_client.py``).

Both clients run the same :meth:`EngineCore.run_busy_loop` over the same messages
(:mod:`gpu_worker.engine.core_messages`): commands go in with :meth:`EngineCoreClient.send`
(from any thread, never blocking), and each turn's :class:`StepResult` comes back through the
``on_result`` callback on a thread the client owns.

* :class:`ThreadCoreClient`: the core on a thread of this process (the default on CPU).
* :class:`ProcessCoreClient`: the core in a child process (the default on CUDA), so no Python
  work of a step competes with the server's event loop for the GIL. A reader thread receives the
  child's results; the parent never loads the model (the tokenizer comes in the ready message).

Either way, a step that raises, or a child that dies, is reported once through ``on_dead`` and
the client delivers nothing after it.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.engine.core import EngineCore
from gpu_worker.engine.core_messages import Command, CoreInfo, Failed, Shutdown, StepResult, take_commands
from gpu_worker.engine.core_proc import run_engine_core
from llmserve.telemetry.logging import LogSettings

logger = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_S = 10.0

OnResult = Callable[[StepResult], None]
OnDead = Callable[[BaseException], None]


class EngineCoreClient(ABC):
    """The front's handle on one engine core."""

    info: CoreInfo

    @abstractmethod
    def start(self, on_result: OnResult, on_dead: OnDead) -> None:
        """Start delivering: ``on_result`` once per loop turn, ``on_dead`` once if the core fails
        (never after :meth:`shutdown`). Both run on the client's thread, one call at a time."""

    @abstractmethod
    def send(self, command: Command) -> None:
        """Queue a command for the core's next turn (safe from any thread; never blocks)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the core and wait for it (blocking); no callback runs afterwards."""


def make_core_client(config: EngineConfig) -> EngineCoreClient:
    """Load the engine (blocking) in the placement ``config.engine_core_process`` asks for
    (default: a child process on CUDA, a thread on the CPU)."""
    if _wants_core_process(config):
        return ProcessCoreClient(config)
    core = EngineCore(config)
    core.warmup()
    return ThreadCoreClient(core)


def _wants_core_process(config: EngineConfig) -> bool:
    if config.tensor_parallel_size * config.pipeline_parallel_size != 1:  # 0: auto, maybe several
        # Several ranks: the core (rank 0) in its own process, which ends itself when a rank dies
        # (the worker then learns it through the pipe, stops serving and exits).
        return True
    if config.engine_core_process is not None:
        return config.engine_core_process
    if config.device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return config.device.startswith("cuda")


class ThreadCoreClient(EngineCoreClient):
    """The core's busy loop on a daemon thread of this process."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.info = core.info()
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, on_result: OnResult, on_dead: OnDead) -> None:
        def run() -> None:
            try:
                self.core.run_busy_loop(lambda block: take_commands(self._inbox, block), on_result)
            except Exception as exc:  # a failed step must not leave streams hanging
                logger.exception("engine core step failed")
                on_dead(exc)

        self._thread = threading.Thread(target=run, name="engine-core", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        self._inbox.put(command)

    def shutdown(self) -> None:
        self.send(Shutdown())
        if self._thread is not None:
            self._thread.join()


class ProcessCoreClient(EngineCoreClient):
    """The core's busy loop in a spawned child process (it may initialise CUDA).

    Commands travel through a multiprocessing queue (its feeder thread writes, so ``send``
    never blocks on a full pipe); results through a pipe read by one reader thread. Only the
    child holds the pipe's write end, so its death reads as EOF here.
    """

    def __init__(self, config: EngineConfig) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._inbox: Any = ctx.Queue()
        self._conn, child_conn = ctx.Pipe(duplex=False)
        args = (config, self._inbox, child_conn, LogSettings.of_this_process())
        # Several ranks: the core spawns the other ranks itself, which a daemonic process may not;
        # it is then stopped at exit by the handler below (and stops itself if this process dies).
        several = config.tensor_parallel_size * config.pipeline_parallel_size != 1
        self._stopping = False
        self._process = ctx.Process(
            target=run_engine_core, args=args, name="engine-core", daemon=not several
        )
        self._process.start()
        if several:
            atexit.register(self.shutdown)
        child_conn.close()
        self._reader: threading.Thread | None = None
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
        self.info = ready

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    def start(self, on_result: OnResult, on_dead: OnDead) -> None:
        def read() -> None:
            while True:
                try:
                    message: StepResult | Failed = self._conn.recv()
                except (EOFError, OSError):
                    if not self._stopping:
                        self._process.join(5.0)
                        code = self._process.exitcode
                        on_dead(RuntimeError(f"the engine core process died (exit code {code})"))
                    return
                except Exception as exc:  # noqa: BLE001 - an unreadable message must not hang every caller
                    on_dead(RuntimeError(f"a message from the engine core could not be read: {exc!r}"))
                    return
                if isinstance(message, Failed):
                    on_dead(message.error)
                    return
                on_result(message)

        self._reader = threading.Thread(target=read, name="engine-core-reader", daemon=True)
        self._reader.start()

    def send(self, command: Command) -> None:
        self._inbox.put(command)

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True  # the reader takes the child's exit as a shutdown, not a death
        if self._process.is_alive():
            self.send(Shutdown())
            self._process.join(_SHUTDOWN_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._inbox.close()
        self._inbox.cancel_join_thread()  # the child is gone: nothing will read what is left
        if self._reader is not None:
            self._reader.join()
