"""Shared helpers of the worker server tests (streams collected per sequence, idle polling,
``python -m gpu_worker`` as a process)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.helpers.health import wait_until_serving

SERVED_NAME = "tiny-llama"
# Small, explicit KV pool: 512 blocks of 16 tokens, enough for 64 concurrent short streams.
ENGINE_ARGS: dict[str, Any] = {"served_model_name": SERVED_NAME, "num_kv_blocks": 512, "max_num_seqs": 128}


@dataclass
class Collected:
    """A whole stream, per sequence index."""

    text: dict[int, str] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    chunks: list[pb.GenerateResponse] = field(default_factory=list)

    @property
    def last(self) -> pb.GenerateResponse:
        return self.chunks[-1]


async def collect(call: grpc.aio.UnaryStreamCall) -> Collected:
    """Read a Generate stream to its end (with ``read()``, so earlier reads may precede it)."""
    out = Collected()
    while (chunk := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        assert isinstance(chunk, pb.GenerateResponse)
        out.chunks.append(chunk)
        out.text[chunk.index] = out.text.get(chunk.index, "") + chunk.text
        out.token_ids.setdefault(chunk.index, []).extend(chunk.token_ids)
        if chunk.finish_reason:
            assert chunk.index not in out.finish, "two finish reasons for one sequence"
            out.finish[chunk.index] = chunk.finish_reason
    return out


def greedy(max_tokens: int, **extra: Any) -> pb.SamplingParams:
    """Greedy, ignore_eos sampling of exactly ``max_tokens`` tokens."""
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)


async def wait_idle(control: ipb_grpc.WorkerControlStub) -> ipb.WorkerInfo:
    """Poll GetWorkerInfo until no request holds KV blocks (bounded: the engine frees at once)."""
    for _ in range(1000):
        info = await control.GetWorkerInfo(ipb.GetWorkerInfoRequest())
        load = info.load
        if load.num_running == 0 and load.num_waiting == 0 and load.num_free_kv_blocks == load.num_kv_blocks:
            return info
        await asyncio.sleep(0.01)
    raise AssertionError(f"KV blocks still held: {info.load}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(proc: subprocess.Popen[Any], target: str) -> None:
    """Wait (bounded) until the worker is SERVING, failing early if the process died."""

    def alive() -> None:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"

    if not wait_until_serving(target, alive, timeout_s=120.0):
        raise AssertionError("worker never became SERVING")


def start_worker(
    model_dir: Path, *extra: str, env: Mapping[str, str] | None = None, stdout: Any = None,
    stderr: Any = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m gpu_worker`` serving ``model_dir`` on a free loopback port, once SERVING.

    ``env`` adds variables to this process's environment; ``stdout``/``stderr`` as for ``Popen``."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "gpu_worker", "--model", str(model_dir), "--served-model-name", SERVED_NAME,
        "--num-kv-blocks", "512", "--host", "127.0.0.1", "--port", str(port), *extra,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=stdout, stderr=stderr)
    target = f"127.0.0.1:{port}"
    try:
        _wait_serving(proc, target)
    except BaseException:
        proc.kill()
        raise
    return proc, target
