"""The project's servers as real subprocesses for tests: ``python -m gpu_worker`` workers,
``python -m router`` routers (and, through :class:`ServiceProc`, ``llmserve up``), each on free
loopback ports with its output in a log file, so SIGKILL and SIGSTOP are real.

Starting waits (bounded) for ``grpc.health.v1`` SERVING and fails at once, with the log's tail,
when the process dies; stopping is SIGTERM, then SIGKILL after a timeout. What differs between
the users (flags, environment, timeouts) is a parameter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.health import wait_until_serving
from tests.helpers.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
# One intra-op thread per server process: several share the test machine's few cores.
ONE_THREAD_ENV: Mapping[str, str] = {"OMP_NUM_THREADS": "1"}

MetricSamples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class ServiceProc:
    """One server subprocess (``cmd``, run from the repository root) whose gRPC health is served
    at ``target``; stdout and stderr go to ``log_path``.

    ``env``: variables set on top of this process's environment (and ``PYTHONUNBUFFERED=1``);
    ``unset_env``: variables removed from it. ``what`` names the process in failure messages.
    ``stop_timeout_s``: how long :meth:`stop` waits after SIGTERM before SIGKILL.
    """

    def __init__(self, what: str, cmd: Sequence[str], target: str, log_path: Path, *,
                 env: Mapping[str, str] | None = None, unset_env: Sequence[str] = (),
                 stop_timeout_s: float = 15.0, log_tail_chars: int = 3000) -> None:
        self.what = what
        self.target = target
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self.log_tail_chars = log_tail_chars
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for var in unset_env:
            full_env.pop(var, None)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close_log()
        self.proc = subprocess.Popen(list(cmd), stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=full_env)

    def log_tail(self) -> str:
        """The end of the process's log (for failure messages)."""
        return self.log_path.read_text(errors="replace")[-self.log_tail_chars:]

    def check_alive(self) -> None:
        """Fail, with the log's tail, when the process has exited."""
        assert self.proc.poll() is None, f"{self.what} died: {self.log_tail()}"

    def wait_serving(self, timeout_s: float = 60.0) -> None:
        """Until ``target`` reports SERVING; fails when the process dies or after ``timeout_s``."""
        if not wait_until_serving(self.target, self.check_alive, timeout_s):
            raise AssertionError(f"{self.what} not serving in time: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no drain, no deregistration."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close_log(self) -> None:
        self._log.close()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after ``stop_timeout_s``; closes the log."""
        stop_all([self], self.stop_timeout_s)


def stop_all(services: Sequence[ServiceProc], timeout_s: float) -> None:
    """SIGTERM to every running one at once (in order), then wait for them all within
    ``timeout_s`` together (SIGKILL to those still running then), then close their logs."""
    for service in services:
        if service.proc.poll() is None:
            service.proc.terminate()
    deadline = time.monotonic() + timeout_s
    for service in services:
        try:
            service.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service.kill()
    for service in services:
        service.close_log()


class WorkerProc(ServiceProc):
    """One ``python -m gpu_worker`` on the CPU serving ``model_dir`` as ``name``, registered in
    Redis at ``redis_url`` (drain grace 2 s); ``extra``: more worker flags."""

    def __init__(self, model_dir: Path, name: str, redis_url: str, log_dir: Path,
                 extra: Sequence[str] = (), worker_id: str | None = None) -> None:
        self.port = free_port()
        self.name = name
        self.worker_id = worker_id or f"{name}-{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gpu_worker", "--model", str(model_dir), "--served-model-name", name,
               "--host", "127.0.0.1", "--port", str(self.port), "--advertise-address", self.address,
               "--redis-url", redis_url, "--worker-id", self.worker_id, "--device", "cpu",
               "--drain-grace-s", "2", *extra]
        super().__init__("worker", cmd, self.address, log_dir / f"worker-{self.worker_id}.log",
                         env=ONE_THREAD_ENV)

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        super().wait_serving(timeout_s)


class RouterProc(ServiceProc):
    """One ``python -m router`` on loopback with ``/metrics``, reading the fleet from Redis at
    ``redis_url`` (drain grace 2 s); ``extra``: more router flags."""

    def __init__(self, redis_url: str, log_dir: Path, name: str, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.name = name
        target = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(self.port),
               "--redis-url", redis_url, "--metrics-port", str(self.metrics_port), "--drain-grace-s", "2",
               *extra]
        super().__init__("router", cmd, target, log_dir / f"router-{name}.log")

    def metrics(self) -> MetricSamples:
        """Every sample of ``/metrics``: (name, labels) -> value."""
        return scrape_metrics(self.metrics_port)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= ls)


def scrape_metrics(port: int, timeout_s: float = 5.0) -> MetricSamples:
    """Every sample of ``http://127.0.0.1:{port}/metrics``: (name, labels) -> value."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 - loopback
        text = reply.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}
