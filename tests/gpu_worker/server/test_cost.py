"""Device seconds and cost of each request on a real worker (tiny llama, loopback): the final
chunk's usage, the request log line, the span and ``/metrics`` agree."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from gpu_worker.server.request_telemetry import REQUEST_LOGGER
from llmserve.telemetry import setup_tracing
from llmserve.telemetry import spans as s
from llmserve.telemetry.logging import FIELDS_ATTR
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect, greedy

pytestmark = pytest.mark.asyncio(loop_scope="module")
PRICE_PER_HOUR = 7200.0  # 2 per device-second: cost is twice the device seconds


@dataclass
class PricedWorker:
    server: WorkerServer
    exporter: InMemorySpanExporter
    stub: pb_grpc.GenerationStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def priced(engine_config: EngineConfig) -> AsyncIterator[PricedWorker]:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing("llmserve-worker", span_exporter=exporter)
    config = ServerConfig(port=0, metrics_port=0, stats_interval_s=0.05, device_cost_per_hour=PRICE_PER_HOUR)
    server = WorkerServer(engine_config, config, tracing=tracing)
    await server.start()
    await server.wait_ready()
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield PricedWorker(server, exporter, pb_grpc.GenerationStub(channel))
    await server.drain(0.1)
    tracing.shutdown()


def _scrape(port: int | None) -> dict[str, float]:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("model_name") == SERVED_NAME}


async def test_usage_log_span_and_counters_carry_device_seconds_and_cost(
    priced: PricedWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    before = await asyncio.to_thread(_scrape, priced.server.metrics_port)
    assert before["llmserve:standby_promotions_total"] == 0  # every worker exports it
    prompts = {f"cost-{i}": [20 + i] * (4 + 6 * i) for i in range(3)}
    results = await asyncio.gather(*(
        collect(priced.stub.Generate(pb.GenerateRequest(
            model=SERVED_NAME, request_id=rid, prompt_token_ids=pb.TokenIds(ids=ids), sampling=greedy(3))))
        for rid, ids in prompts.items()))
    usage = {rid: r.last.usage.device_seconds for rid, r in zip(prompts, results, strict=True)}
    assert all(v > 0 for v in usage.values()), usage

    records = {getattr(r, FIELDS_ATTR)["request_id"]: getattr(r, FIELDS_ATTR)
               for r in caplog.records if r.name == REQUEST_LOGGER}
    for rid, device_s in usage.items():
        assert records[rid]["device_s"] == pytest.approx(device_s)
        assert records[rid]["cost"] == pytest.approx(2 * device_s)
    spans = {(x.attributes or {}).get(s.LLMSERVE_REQUEST_ID): dict(x.attributes or {})
             for x in priced.exporter.get_finished_spans() if x.name == s.WORKER_GENERATE_SPAN}
    for rid, device_s in usage.items():
        assert spans[rid][s.LLMSERVE_USAGE_DEVICE_SECONDS] == pytest.approx(device_s)
        assert spans[rid][s.LLMSERVE_USAGE_COST] == pytest.approx(2 * device_s)

    after = await asyncio.to_thread(_scrape, priced.server.metrics_port)
    counted = after["llmserve:device_seconds_total"] - before["llmserve:device_seconds_total"]
    # The core attributes every step's time to the requests it computed; all three ran to their
    # length, so the counter grew by exactly what their usages report.
    assert counted == pytest.approx(sum(usage.values()), rel=1e-6)
    cost = after["llmserve:cost_total"] - before["llmserve:cost_total"]
    assert cost == pytest.approx(2 * counted, rel=1e-6)
