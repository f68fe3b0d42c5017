"""Check scripts run under ``TRITON_INTERPRET=1`` in fresh subprocesses, several at once.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, and other tests of the same pytest
process may have imported triton already, so interpreted checks run in subprocesses with the
variable set. The interpreter runs one program at a time in one Python thread, so independent
runs started together use the machine's cores instead of queueing on one. Each script prints, as
its last line of stdout, ``{check: "ok" | traceback}`` as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class InterpretedRun:
    """One subprocess: ``python *argv`` (from the repository root) that must report ``checks``."""

    argv: tuple[str, ...]
    checks: tuple[str, ...]


def run_interpreted(runs: Mapping[str, InterpretedRun], timeout_s: float) -> dict[str, dict[str, str]]:
    """Start every run at once (one thread of torch each), wait for all; ``{run: {check: result}}``.

    Raises AssertionError naming the run when one crashes, prints no result or reports other
    checks than it was given, and kills every run still going after ``timeout_s`` seconds."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="interpreted-") as tmp:
        procs: dict[str, subprocess.Popen[bytes]] = {}
        logs: dict[str, tuple[Path, Path]] = {}
        try:
            for name, run in runs.items():
                out, err = Path(tmp, f"{name}.out"), Path(tmp, f"{name}.err")
                logs[name] = (out, err)
                with out.open("wb") as fo, err.open("wb") as fe:
                    procs[name] = subprocess.Popen([sys.executable, *run.argv], cwd=ROOT, env=env,
                                                   stdout=fo, stderr=fe)
            deadline = time.monotonic() + timeout_s
            for name, proc in procs.items():
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"interpreted run {name} ran past {timeout_s:.0f} s") from None
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return {name: _results(name, procs[name].returncode, *logs[name], runs[name].checks) for name in runs}


def _results(name: str, returncode: int, out: Path, err: Path, checks: Sequence[str]) -> dict[str, str]:
    stdout = out.read_text(errors="replace")
    stderr = err.read_text(errors="replace")
    assert returncode == 0, (f"interpreted run {name} crashed ({returncode}):\n"
                             f"{stdout[-4000:]}\n{stderr[-4000:]}")
    lines = stdout.strip().splitlines()
    assert lines, f"interpreted run {name} printed nothing:\n{stderr[-4000:]}"
    results: dict[str, str] = json.loads(lines[-1])
    assert sorted(results) == sorted(checks), f"interpreted run {name}: {sorted(results)} != {sorted(checks)}"
    return results
