"""deploy/drain_worker.py (``llmserve-drain``, the workers' preStop hook) against a real worker process.

Scale-down as Kubernetes does it: the hook command of the rendered worker Deployment runs while
streams are in flight. The worker must be marked draining in Redis (so routers stop sending it
work), refuse new streams, finish every stream it had accepted to its last token, stop by itself,
and the hook must return only then, so the kubelet's SIGTERM that follows has nothing left to cut.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from llmserve.fleet.redis_store import RedisStateStore
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.deploy.deploy_manifests import DRAIN_COMMAND, DRAIN_SCRIPT, containers, find, render_kustomize
from tests.helpers.redis_server import RedisServer
from tests.router.router_procs import WorkerProc

MODEL = "tiny-drain"
STREAMS = 6
MAX_TOKENS = 300  # 6 streams run one at a time (--max-num-seqs 1): seconds of work in flight


def _pre_stop_command(worker_port: int) -> list[str]:
    """The worker Deployment's preStop command, aimed at this test's worker."""
    worker = find(render_kustomize("base"), "Deployment", "llmserve-worker")
    (container,) = containers(worker)
    command = list(container["lifecycle"]["preStop"]["exec"]["command"])
    assert command[0] == DRAIN_COMMAND
    return [sys.executable, str(DRAIN_SCRIPT)] + [a.replace(":50061", f":{worker_port}") for a in command[1:]]


async def _read_all(call: grpc.aio.UnaryStreamCall) -> tuple[int, str]:
    """Tokens received and the finish reason of one stream."""
    tokens, finish = 0, ""
    while (chunk := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        assert isinstance(chunk, pb.GenerateResponse)
        tokens += len(chunk.token_ids)
        finish = chunk.finish_reason or finish
    return tokens, finish


async def _draining_in_redis(store: RedisStateStore, worker_id: str) -> bool:
    view = await store.read_fleet()
    return any(w.worker_id == worker_id and w.draining for w in view.workers)


async def test_pre_stop_hook_drains_in_flight_streams_then_returns(
    redis_server: RedisServer, tiny_model: Callable[[str], Path], tmp_path: Path
) -> None:
    worker = WorkerProc(tiny_model("llama"), MODEL, redis_server.url, tmp_path,
                        extra=("--max-num-seqs", "1", "--drain-grace-s", "120"))
    store = RedisStateStore(redis_server.url)
    hook: subprocess.Popen[str] | None = None
    try:
        worker.wait_serving()
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            control = ipb_grpc.WorkerControlStub(channel)
            sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            calls = [stub.Generate(pb.GenerateRequest(model=MODEL, prompt=f"stream {i}", sampling=sampling),
                                   timeout=300) for i in range(STREAMS)]
            first = await calls[0].read()  # the streams are admitted and running
            assert isinstance(first, pb.GenerateResponse) and first.token_ids

            hook = subprocess.Popen(_pre_stop_command(worker.port), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            for _ in range(600):  # bounded: until the hook's Drain call has landed
                info = await control.GetWorkerInfo(ipb.GetWorkerInfoRequest(), timeout=10)
                if info.draining:
                    break
                assert hook.poll() is None, hook.communicate()[0]
                await asyncio.sleep(0.05)
            assert info.draining, "the hook never started the drain"
            assert info.load.num_running + info.load.num_waiting >= 1, "nothing was in flight to drain"
            for _ in range(100):  # the heartbeat publishes the drain to Redis within a tick
                if await _draining_in_redis(store, worker.worker_id):
                    break
                await asyncio.sleep(0.05)
            assert await _draining_in_redis(store, worker.worker_id), "routers were not told"

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(pb.GenerateRequest(model=MODEL, prompt="late", sampling=sampling),
                                    timeout=30).read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            rest = await _read_all(calls[0])
            results = [(rest[0] + len(first.token_ids), rest[1])]
            results += [await _read_all(c) for c in calls[1:]]
        assert results == [(MAX_TOKENS, "length")] * STREAMS, "a stream was cut"

        output, _ = hook.communicate(timeout=120)
        assert hook.returncode == 0, output
        assert "drained and stopped" in output
        assert worker.proc.wait(timeout=60) == 0, "the worker did not stop by itself after the drain"
        view = await store.read_fleet()
        assert worker.worker_id not in {w.worker_id for w in view.workers}, "still registered"
    finally:
        if hook is not None and hook.poll() is None:
            hook.kill()
        await store.close()
        worker.stop()


def test_hook_on_a_stopped_worker_exits_zero() -> None:
    """A pod whose worker already exited (crash, earlier SIGTERM): nothing to drain, no failed hook."""
    from tests.helpers.redis_server import free_port

    result = subprocess.run([sys.executable, str(DRAIN_SCRIPT), f"127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nothing to drain" in result.stdout
