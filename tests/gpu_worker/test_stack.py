"""`llmserve up`: router + worker in one process on the embedded state store, then stopped."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from gpu_worker.stack import StackConfig, run_stack
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from tests.router.router_procs import free_port, generate


async def test_stack_serves_through_the_router_on_the_memory_store(
    tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = StackConfig(model=str(tiny_model("llama")), served_model_name="tiny", router_port=free_port(),
                         worker_port=free_port(), http_port=free_port(), num_kv_blocks=64, max_num_seqs=4,
                         drain_grace_s=1.0, kv_cache_dtype="fp8")
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_stack(config, started, stop))
    await asyncio.wait({task, asyncio.create_task(started.wait())}, return_when=asyncio.FIRST_COMPLETED,
                       timeout=120)
    assert started.is_set(), task.exception() if task.done() else "stack did not start"
    assert "called in-process" in capsys.readouterr().out  # the router's hop to its own worker
    target = f"127.0.0.1:{config.router_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        models = await gen_grpc.GenerationStub(channel).ListModels(gen_pb.ListModelsRequest())
    assert [(m.name, m.num_workers) for m in models.models] == [("tiny", 1)]
    # engine flags reach the worker, and the router's ListModels says what is served
    assert (models.models[0].quantization, models.models[0].kv_cache_dtype) == ("none", "fp8")
    # the OpenAI HTTP door is on (llmserve up serves it on 8000 by default)
    url = f"http://127.0.0.1:{config.http_port}/v1/models"
    listing = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=30)))
    assert [m["id"] for m in listing["data"]] == ["tiny"]
    prompt = "hello " * 40
    _, wid = await generate(target, model="tiny", prompt=prompt)
    # The worker's KV events reach the in-process store too: the repeat hits the prefix cache.
    for _ in range(50):
        chunks, wid2 = await generate(target, model="", prompt=prompt)  # one model: the name may be omitted
        if chunks[-1].usage.cached_prompt_tokens > 0:
            break
        await asyncio.sleep(0.1)
    assert wid2 == wid and chunks[-1].usage.cached_prompt_tokens >= 32
    stop.set()
    await asyncio.wait_for(task, timeout=60)


async def test_stack_without_the_inprocess_hop_calls_its_worker_over_grpc(
    tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = StackConfig(model=str(tiny_model("llama")), served_model_name="tiny", router_port=free_port(),
                         worker_port=free_port(), http_port=None, num_kv_blocks=64, max_num_seqs=4,
                         drain_grace_s=1.0, inprocess_worker=False)
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_stack(config, started, stop))
    await asyncio.wait({task, asyncio.create_task(started.wait())}, return_when=asyncio.FIRST_COMPLETED,
                       timeout=120)
    assert started.is_set(), task.exception() if task.done() else "stack did not start"
    assert "called gRPC" in capsys.readouterr().out
    chunks, _ = await generate(f"127.0.0.1:{config.router_port}", model="tiny", prompt="hello there")
    assert chunks[-1].usage.completion_tokens == 4
    stop.set()
    await asyncio.wait_for(task, timeout=60)


def test_llmserve_up_help() -> None:
    out = subprocess.run([sys.executable, "-m", "llmserve.cli", "up", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--redis-url" in out.stdout and "smollm2-135m" in out.stdout
    assert "--http-port" in out.stdout
    assert "--quantization" in out.stdout and "--kv-cache-dtype" in out.stdout
    assert "--no-inprocess-worker" in out.stdout
