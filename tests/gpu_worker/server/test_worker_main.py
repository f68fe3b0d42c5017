"""``python -m gpu_worker`` as a real process: ``--redis-url`` registers the worker in the fleet
registry; SIGTERM drains (in-flight streams finish), deregisters and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from worker_server_helpers import SERVED_NAME, collect, greedy

from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(proc: subprocess.Popen[bytes], target: str) -> None:
    """Poll health until SERVING (bounded), failing early if the process died."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            assert proc.poll() is None, f"worker exited with {proc.returncode}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            subprocess.run(["sleep", "0.1"], check=True)
    raise AssertionError("worker never became SERVING")


def start_worker(model_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "gpu_worker",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--num-kv-blocks",
        "512",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    target = f"127.0.0.1:{port}"
    try:
        _wait_serving(proc, target)
    except BaseException:
        proc.kill()
        raise
    return proc, target


async def test_sigterm_drains_registered_worker(tiny_model_dir: Path, redis_server: object) -> None:
    """Registered via --redis-url; on SIGTERM the in-flight stream runs to its end, the worker
    deregisters and exits 0."""
    from llmserve.fleet import open_store

    url = redis_server.url  # type: ignore[attr-defined]
    proc, target = start_worker(
        tiny_model_dir, "--redis-url", url, "--advertise-address", "10.1.2.3:7777", "--drain-grace-s", "60"
    )
    store = open_store(url)
    try:
        [record] = (await store.read_fleet()).workers
        assert (record.model, record.address, record.block_size) == (SERVED_NAME, "10.1.2.3:7777", 16)
        assert record.load.num_kv_blocks == 512 and not record.draining
        async with grpc.aio.insecure_channel(target) as channel:
            gen = pb_grpc.GenerationStub(channel)
            call = gen.Generate(pb.GenerateRequest(model=SERVED_NAME, prompt="Once", sampling=greedy(300)))
            first = await call.read()
            proc.send_signal(signal.SIGTERM)
            rest = await collect(call)
            assert len(first.token_ids) + len(rest.token_ids[0]) == 300 and rest.finish == {0: "length"}
        assert await asyncio.to_thread(proc.wait, 60) == 0
        assert (await store.read_fleet()).workers == ()  # deregistered on the way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await store.close()
