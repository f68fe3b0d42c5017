"""The shared server-process helper's failure paths, on plain Python subprocesses: a process that
dies while starting fails the wait at once with its log, and a process that ignores SIGTERM is
SIGKILLed after the stop timeout."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.redis_server import free_port
from tests.helpers.service_procs import ServiceProc, stop_all


def _python(code: str, tmp_path: Path, name: str) -> ServiceProc:
    return ServiceProc(name, [sys.executable, "-c", code], f"127.0.0.1:{free_port()}",
                       tmp_path / f"{name}.log", env={"SERVICE_PROCS_TEST": "set"}, stop_timeout_s=0.5)


def test_a_dying_process_fails_the_wait_at_once_with_its_log(tmp_path: Path) -> None:
    proc = _python("import os; print('env', os.environ['SERVICE_PROCS_TEST']); raise SystemExit(3)", tmp_path,
                   "dies")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="dies died: env set"):
        proc.wait_serving(timeout_s=30)
    assert time.monotonic() - start < 10
    proc.stop()
    assert proc.proc.returncode == 3


def test_stop_kills_what_ignores_sigterm_and_closes_the_logs(tmp_path: Path) -> None:
    stubborn = _python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', "
                       "flush=True); time.sleep(60)", tmp_path, "stubborn")
    polite = _python("import time; print('up', flush=True); time.sleep(60)", tmp_path, "polite")
    deadline = time.monotonic() + 20
    while not (stubborn.log_tail() and polite.log_tail()):  # both started (the handler is set)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stop_all([stubborn, polite], timeout_s=0.5)
    assert stubborn.proc.returncode == -signal.SIGKILL
    assert polite.proc.returncode == -signal.SIGTERM
    assert stubborn._log.closed and polite._log.closed
