"""``llmserve up`` in a subprocess, as a user starts it: router (gRPC with the KServe door, and the
OpenAI HTTP door) + one CPU worker on the tiny model, traces exported over OTLP to the test's
receiver. One per test session (``conftest.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.health import wait_until_serving
from tests.helpers.redis_server import free_port

REPO = Path(__file__).resolve().parents[3]
MODEL = "tiny"


class StackProc:
    """One ``llmserve up`` process on free loopback ports."""

    def __init__(self, model_dir: Path, log_path: Path, otlp_endpoint: str) -> None:
        self.router_port, self.worker_port, self.http_port = free_port(), free_port(), free_port()
        self.grpc_target = f"127.0.0.1:{self.router_port}"
        self.worker_target = f"127.0.0.1:{self.worker_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.openai_url = f"{self.http_url}/v1"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "llmserve.cli", "up", "--model", str(model_dir),
               "--served-model-name", MODEL, "--port", str(self.router_port),
               "--worker-port", str(self.worker_port), "--http-port", str(self.http_port),
               "--num-kv-blocks", "512", "--max-num-seqs", "8"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_SCHEDULE_DELAY": "50"}
        for var in ("OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER"):
            env.pop(var, None)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def _alive(self) -> None:
        assert self.proc.poll() is None, f"llmserve up died: {self.log_tail()}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        if not wait_until_serving(self.grpc_target, self._alive, timeout_s):
            raise AssertionError(f"router not serving in time: {self.log_tail()}")
        deadline = time.monotonic() + 30
        while http_json("GET", f"{self.http_url}/health")[0] != 200:
            self._alive()
            assert time.monotonic() < deadline, f"HTTP door not healthy: {self.log_tail()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def http_json(method: str, url: str, body: bytes | dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of one plain HTTP request (no client library in between)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")
