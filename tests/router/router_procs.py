"""Real processes for the router tests: redis-server and `python -m gpu_worker` workers.

Workers are subprocesses so SIGKILL is real. Each waits (bounded) for gRPC health SERVING.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from tests.helpers.health import wait_until_serving
from tests.helpers.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]

# The suite's one redis-server helper, under the name these tests use.
RedisProc = RedisServer


class WorkerProc:
    """One `python -m gpu_worker` serving a tiny model, registered in Redis."""

    def __init__(self, model_dir: Path, name: str, redis_url: str, log_dir: Path,
                 extra: Sequence[str] = (), worker_id: str | None = None) -> None:
        self.port = free_port()
        self.name = name
        self.worker_id = worker_id or f"{name}-{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"worker-{self.worker_id}.log"
        cmd = [sys.executable, "-m", "gpu_worker", "--model", str(model_dir), "--served-model-name", name,
               "--host", "127.0.0.1", "--port", str(self.port), "--advertise-address", self.address,
               "--redis-url", redis_url, "--worker-id", self.worker_id, "--device", "cpu",
               "--drain-grace-s", "2", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        def alive() -> None:
            assert self.proc.poll() is None, f"worker died: {self.log_path.read_text()[-3000:]}"

        if not wait_until_serving(self.address, alive, timeout_s):
            raise AssertionError(f"worker not serving in time: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no drain, no deregistration."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def start_workers(workers: Sequence[WorkerProc]) -> None:
    for w in workers:
        w.wait_serving()


async def generate(target: str, *, model: str, timeout_s: float = 60.0,
                   **kwargs: object) -> tuple[list[gen_pb.GenerateResponse], str]:
    """All chunks of one Generate call and the serving worker id."""
    sampling = kwargs.pop("sampling", None) or gen_pb.SamplingParams(max_tokens=4, temperature=0.0)
    request = gen_pb.GenerateRequest(model=model, sampling=sampling, **kwargs)  # type: ignore[arg-type]
    async with grpc.aio.insecure_channel(target) as channel:
        chunks = [c async for c in gen_grpc.GenerationStub(channel).Generate(request, timeout=timeout_s)]
    return chunks, chunks[-1].worker_id


async def wait_until(cond, timeout_s: float = 20.0, interval_s: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    """Poll an async condition until true (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await cond():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(interval_s)
