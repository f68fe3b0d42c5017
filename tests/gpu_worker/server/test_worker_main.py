"""``python -m gpu_worker`` as a real process: ``--redis-url`` registers the worker in the fleet
registry; SIGTERM drains (in-flight streams finish), deregisters and exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect, greedy, start_worker


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


def test_every_flag_reads_its_llmserve_variable() -> None:
    """LLMSERVE_<FLAG> supplies defaults (required --model included); a flag on the command line wins."""
    from gpu_worker.__main__ import build_parser, configs_from_args

    env = {
        "LLMSERVE_MODEL": "some-model", "LLMSERVE_METRICS_PORT": "9401", "LLMSERVE_LOG_FORMAT": "json",
        "LLMSERVE_LOG_LEVEL": "debug", "LLMSERVE_ENABLE_PREFIX_CACHING": "false",
        "LLMSERVE_MAX_NUM_SEQS": "8",
    }
    args = build_parser(env).parse_args(["--max-num-seqs", "4"])
    assert (args.model, args.metrics_port) == ("some-model", 9401)
    assert (args.log_format, args.log_level) == ("json", "DEBUG")
    assert (args.enable_prefix_caching, args.max_num_seqs) == (False, 4)
    engine_config, server_config = configs_from_args(args)
    assert server_config.metrics_port == 9401 and engine_config.max_num_seqs == 4
    assert build_parser({"LLMSERVE_MODEL": "m"}).parse_args([]).metrics_port is None  # off by default
    helps = " ".join(a.help or "" for a in build_parser({})._actions)
    assert "[env: LLMSERVE_METRICS_PORT]" in helps and "[env: LLMSERVE_LOG_FORMAT]" in helps
    with pytest.raises(SystemExit):
        build_parser({"LLMSERVE_MODEL": "m", "LLMSERVE_LOG_FORMAT": "xml"})
