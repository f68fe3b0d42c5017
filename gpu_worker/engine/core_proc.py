"""The child side of :class:`~gpu_worker.engine.core_client.ProcessCoreClient` (vLLM v1's
``EngineCoreProc``).

The child builds :class:`EngineCore` and runs its busy loop (:meth:`EngineCore.run_busy_loop`,
the same loop a thread runs in-process). As in vLLM, the main thread only applies commands and
steps: an **input thread** moves commands from the parent's queue (unpickling them) into a
local queue the loop drains without blocking, and an **output thread** pickles each
:class:`StepResult` (its outputs as flat columns) and writes it to the pipe, so both overlap
the next step (torch and the wait for the sampled ids release the GIL).

The child is started with the ``spawn`` context so it may initialise CUDA; a spawned
interpreter starts with logging unconfigured, so the parent hands it its :class:`LogSettings`
and the child's lines reach the shared stderr in the parent's format. A killed parent is
noticed within ``_PARENT_CHECK_S`` and the child stops, so the GPU is never held by an orphan.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from multiprocessing.connection import Connection
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.engine.core_messages import Command, Failed, Shutdown, StepResult, take_commands
from llmserve.gc_tuning import freeze_startup_objects
from llmserve.telemetry.logging import LogSettings

logger = logging.getLogger(__name__)

_PARENT_CHECK_S = 1.0  # how often the input thread checks that the parent is alive


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
    alone), build the core, send its :class:`CoreInfo` (or :class:`Failed`), then serve until
    Shutdown. A step that raises is sent as :class:`Failed` and ends the child."""
    if log_settings is not None:
        log_settings.apply()
    from gpu_worker.engine.core import EngineCore  # torch and the model: child only

    try:
        core = EngineCore(config)
        core.warmup()
        conn.send(core.info())
    except BaseException as exc:  # the parent re-raises it from ProcessCoreClient()
        conn.send(Failed(_picklable(exc)))
        return
    commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
    sends: queue.SimpleQueue[StepResult | Failed | None] = queue.SimpleQueue()  # None: no more
    threading.Thread(target=_read_commands, args=(inbox, commands), name="core-input", daemon=True).start()
    sender = threading.Thread(target=_send_results, args=(sends, conn), name="core-output", daemon=True)
    sender.start()
    freeze_startup_objects()  # the model and torch's objects: never walked by collections again
    try:
        core.run_busy_loop(lambda block: take_commands(commands, block), sends.put)
    except Exception as exc:
        logger.exception("engine core process failed")
        sends.put(Failed(_picklable(exc)))
    finally:
        sends.put(None)
        sender.join()  # everything queued reaches the pipe before the child exits


def _read_commands(inbox: Any, commands: queue.SimpleQueue[Command]) -> None:
    """Input thread: parent's queue -> ``commands`` until Shutdown (queued too if the parent died)."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            command: Command = inbox.get(timeout=_PARENT_CHECK_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                commands.put(Shutdown())
                return
            continue
        except (EOFError, OSError):
            commands.put(Shutdown())
            return
        commands.put(command)
        if isinstance(command, Shutdown):
            return


def _send_results(sends: queue.SimpleQueue[StepResult | Failed | None], conn: Connection) -> None:
    """Output thread: pickle and write each message, in order, until None."""
    while True:
        message = sends.get()
        if message is None:
            return
        try:
            conn.send(message)
        except (BrokenPipeError, OSError):  # the parent is gone: nothing to tell
            return
