"""``llmserve up`` in a subprocess, as a user starts it: router (gRPC with the KServe door, and the
OpenAI HTTP door) + one CPU worker on the tiny model, traces exported over OTLP to the test's
receiver. One per test session (``conftest.py``)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers.redis_server import free_port
from tests.helpers.service_procs import ONE_THREAD_ENV, ServiceProc

MODEL = "tiny"


class StackProc(ServiceProc):
    """One ``llmserve up`` process on free loopback ports."""

    def __init__(self, model_dir: Path, log_path: Path, otlp_endpoint: str, extra_args: tuple[str, ...] = ()
                 ) -> None:
        self.router_port, self.worker_port, self.http_port = free_port(), free_port(), free_port()
        self.grpc_target = f"127.0.0.1:{self.router_port}"
        self.worker_target = f"127.0.0.1:{self.worker_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.openai_url = f"{self.http_url}/v1"
        cmd = [sys.executable, "-m", "llmserve.cli", "up", "--model", str(model_dir),
               "--served-model-name", MODEL, "--port", str(self.router_port),
               "--worker-port", str(self.worker_port), "--http-port", str(self.http_port),
               "--num-kv-blocks", "512", "--max-num-seqs", "8", "--tool-call-parser", "hermes",
               "--reasoning-parser", "qwen3", *extra_args]
        env = {**ONE_THREAD_ENV,
               "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_SCHEDULE_DELAY": "50"}
        super().__init__("llmserve up", cmd, self.grpc_target, log_path, env=env,
                         unset_env=("OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER"),
                         stop_timeout_s=30.0, log_tail_chars=4000)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until the router's gRPC door serves (``timeout_s``), then its HTTP door is healthy (30 s)."""
        self.wait_serving(timeout_s)
        deadline = time.monotonic() + 30
        while http_json("GET", f"{self.http_url}/health")[0] != 200:
            self.check_alive()
            assert time.monotonic() < deadline, f"HTTP door not healthy: {self.log_tail()}"
            time.sleep(0.1)


@contextmanager
def running_stack(model_dir: Path, log_path: Path, otlp_endpoint: str,
                  extra_args: tuple[str, ...] = ()) -> Iterator[StackProc]:
    """A started, ready :class:`StackProc`, stopped on leaving (what a stack fixture yields)."""
    proc = StackProc(model_dir, log_path, otlp_endpoint, extra_args)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


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
