"""Observability of a real worker on loopback (tiny llama): the Generate span continues the
caller's W3C trace, ``/metrics`` counts exactly what was served, one log line per request."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from gpu_worker.server.request_telemetry import REQUEST_LOGGER
from llmserve.telemetry import setup_tracing
from llmserve.telemetry import spans as s
from llmserve.telemetry.logging import FIELDS_ATTR, JsonFormatter
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import (
    SERVED_NAME,
    collect,
    free_port,
    greedy,
    start_worker,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
WORKER_ID = "worker-obs"


@dataclass
class TracedWorker:
    server: WorkerServer
    exporter: InMemorySpanExporter
    stub: pb_grpc.GenerationStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traced(engine_config: EngineConfig) -> AsyncIterator[TracedWorker]:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing("llmserve-worker", span_exporter=exporter)
    config = ServerConfig(port=0, metrics_port=0, worker_id=WORKER_ID, stats_interval_s=0.05)
    server = WorkerServer(engine_config, config, tracing=tracing)
    await server.start()
    await server.wait_ready()
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield TracedWorker(server, exporter, pb_grpc.GenerationStub(channel))
    await server.drain(0.1)
    tracing.shutdown()


def _request(request_id: str, prompt_ids: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=SERVED_NAME, request_id=request_id, prompt_token_ids=pb.TokenIds(ids=prompt_ids),
        sampling=greedy(max_tokens, top_k=5, seed=3),
    )


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _by_name(spans: tuple[ReadableSpan, ...], name: str, request_id: str | None = None) -> list[ReadableSpan]:
    def wanted(x: ReadableSpan) -> bool:
        return request_id is None or (x.attributes or {}).get(s.LLMSERVE_REQUEST_ID) == request_id

    return [x for x in spans if x.name == name and wanted(x)]


async def test_generate_span_continues_the_callers_trace(traced: TracedWorker) -> None:
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),)
    result = await collect(traced.stub.Generate(_request("traced-1", [5, 6, 7, 8, 9], 4), metadata=metadata))
    assert len(result.token_ids[0]) == 4 and result.finish == {0: "length"}

    spans = traced.exporter.get_finished_spans()
    [server] = [x for x in _by_name(spans, "/llmserve.v1.Generation/Generate") if x.kind == SpanKind.SERVER
                and format(x.context.trace_id, "032x") == TRACE_ID]
    [gen] = _by_name(spans, s.WORKER_GENERATE_SPAN, "traced-1")
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_SPAN_ID
    assert gen.parent is not None and gen.parent.span_id == server.context.span_id
    attributes = dict(gen.attributes or {})
    assert attributes[s.GEN_AI_REQUEST_MODEL] == SERVED_NAME
    assert attributes[s.GEN_AI_USAGE_INPUT_TOKENS] == 5
    assert attributes[s.GEN_AI_USAGE_OUTPUT_TOKENS] == 4
    assert attributes[s.LLMSERVE_USAGE_CACHED_TOKENS] == result.last.usage.cached_prompt_tokens
    assert tuple(attributes[s.GEN_AI_RESPONSE_FINISH_REASONS]) == ("length",)  # type: ignore[arg-type]
    assert attributes[s.LLMSERVE_WORKER_ID] == WORKER_ID
    assert (attributes[s.GEN_AI_REQUEST_MAX_TOKENS], attributes[s.GEN_AI_REQUEST_TOP_K]) == (4, 5)
    assert attributes[s.GEN_AI_REQUEST_SEED] == 3
    assert [e.name for e in gen.events] == [s.EVENT_QUEUED, s.EVENT_SCHEDULED, s.EVENT_FIRST_TOKEN,
                                            s.EVENT_FINISHED]
    stages = {x.name for x in spans if x.parent is not None and x.parent.span_id == gen.context.span_id}
    assert stages == {s.WORKER_QUEUE_SPAN, s.WORKER_PREFILL_SPAN, s.WORKER_DECODE_SPAN}
    # Health checks are not traced.
    assert not [x for x in spans if "grpc.health" in x.name]


async def test_metrics_count_what_was_served(traced: TracedWorker) -> None:
    port = traced.server.metrics_port
    assert port is not None
    before = await asyncio.to_thread(_scrape, port)
    prompts = [[10 + i] * (3 + i) for i in range(5)]
    max_tokens = 3
    results = await asyncio.gather(*(
        collect(traced.stub.Generate(_request(f"m-{i}", p, max_tokens))) for i, p in enumerate(prompts)
    ))
    assert all(r.finish == {0: "length"} for r in results)
    after = await asyncio.to_thread(_scrape, port)

    model = (("model_name", SERVED_NAME),)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = model) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    n = len(prompts)
    assert delta("llmserve:prompt_tokens_total") == sum(map(len, prompts))
    assert delta("llmserve:generation_tokens_total") == n * max_tokens
    success = (("finished_reason", "length"), ("model_name", SERVED_NAME))
    assert delta("llmserve:request_success_total", success) == n
    assert delta("llmserve:time_to_first_token_seconds_count") == n
    assert delta("llmserve:e2e_request_latency_seconds_count") == n
    assert delta("llmserve:request_queue_time_seconds_count") == n
    assert delta("llmserve:inter_token_latency_seconds_count") == n * (max_tokens - 1)
    # Engine series, refreshed on scrape: idle again, and the prompts were looked up.
    assert after[("llmserve:num_requests_running", model)] == 0
    assert after[("llmserve:kv_cache_usage_perc", model)] == 0
    assert after[("llmserve:kv_cache_capacity_tokens", model)] == 512 * 16  # the pool, in tokens
    assert delta("llmserve:prefix_cache_queries_total") >= delta("llmserve:prefix_cache_hits_total") >= 0
    assert delta("llmserve:prefix_cache_queries_total") > 0


async def test_cancelled_stream_counts_as_abort(traced: TracedWorker) -> None:
    port = traced.server.metrics_port
    assert port is not None
    abort = ("llmserve:request_success_total", (("finished_reason", "abort"), ("model_name", SERVED_NAME)))
    before = (await asyncio.to_thread(_scrape, port)).get(abort, 0.0)
    call = traced.stub.Generate(_request("cancel-1", [3, 4, 5], 400))
    await call.read()
    call.cancel()
    for _ in range(200):  # the handler sees the cancellation asynchronously
        if (await asyncio.to_thread(_scrape, port)).get(abort, 0.0) == before + 1:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the cancelled request was not counted as abort")
    [gen] = _by_name(traced.exporter.get_finished_spans(), s.WORKER_GENERATE_SPAN, "cancel-1")
    assert tuple((gen.attributes or {})[s.GEN_AI_RESPONSE_FINISH_REASONS]) == ("abort",)  # type: ignore[arg-type]
    assert s.EVENT_CANCELLED in [e.name for e in gen.events]


async def test_one_log_line_per_request(traced: TracedWorker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),)
    for i in range(3):
        await collect(traced.stub.Generate(_request(f"log-{i}", [7, 8, 9, 10], 2), metadata=metadata))
    records = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    assert [getattr(r, FIELDS_ATTR)["request_id"] for r in records] == ["log-0", "log-1", "log-2"]
    fields = getattr(records[0], FIELDS_ATTR)
    assert records[0].levelno == logging.INFO
    assert (fields["trace_id"], fields["model"], fields["worker"]) == (TRACE_ID, SERVED_NAME, WORKER_ID)
    assert (fields["prompt_tokens"], fields["completion_tokens"], fields["finish_reason"]) == (4, 2, "length")
    assert 0 < fields["ttft_s"] <= fields["e2e_s"]
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["event"] == "request finished" and line["request_id"] == "log-0"


async def test_worker_without_tracing_imports_no_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from gpu_worker.__main__ import build_parser\n"
        "from gpu_worker.server import WorkerServer\n"
        "from gpu_worker.server import request_telemetry, engine_metrics\n"
        "from llmserve.telemetry import setup_tracing\n"
        "assert not setup_tracing('llmserve-worker').enabled\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'opentelemetry imported'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"}
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


async def test_worker_process_env_flags_json_logs_metrics_and_console_traces(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``python -m gpu_worker`` configured by LLMSERVE_* and OTEL_* variables only."""
    metrics_port = free_port()
    env = {
        "LLMSERVE_METRICS_PORT": str(metrics_port), "LLMSERVE_LOG_FORMAT": "json",
        "LLMSERVE_LOG_LEVEL": "info", "LLMSERVE_WORKER_ID": "w-proc", "OTEL_TRACES_EXPORTER": "console",
    }
    with open(tmp_path / "stderr", "wb") as err, open(tmp_path / "stdout", "wb") as out:
        proc, target = await asyncio.to_thread(start_worker, tiny_model_dir, env=env, stderr=err, stdout=out)
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.GenerationStub(channel)
                for i in range(2):
                    await collect(stub.Generate(_request(f"proc-{i}", [4, 5, 6], 2)))
            scraped = await asyncio.to_thread(_scrape, metrics_port)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert scraped[("llmserve:generation_tokens_total", (("model_name", SERVED_NAME),))] == 4
    lines = [json.loads(x) for x in (tmp_path / "stderr").read_text().splitlines() if x.startswith("{")]
    finished = [x for x in lines if x.get("event") == "request finished"]
    assert [(x["request_id"], x["worker"], x["completion_tokens"]) for x in finished] == [
        ("proc-0", "w-proc", 2), ("proc-1", "w-proc", 2)]
    assert all(len(x["trace_id"]) == 32 for x in finished)
    assert (tmp_path / "stdout").read_text().count(f'"name": "{s.WORKER_GENERATE_SPAN}"') == 2


async def test_engine_core_process_logs_in_the_workers_format(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With ``--engine-core-process`` the core runs in a spawned child: its lines follow the
    worker's ``--log-format json`` and ``--log-level`` too (the child builds the core, so its
    "engine core ready" INFO line can only come from there)."""
    flags = ("--engine-core-process", "--log-format", "json", "--log-level", "info")
    with open(tmp_path / "stderr", "wb") as err:
        proc, _ = await asyncio.to_thread(start_worker, tiny_model_dir, *flags, stderr=err)
        proc.terminate()  # SERVING: the child has logged its ready line
        try:
            await asyncio.to_thread(proc.wait, 60)
        finally:
            proc.kill()  # a no-op once it has exited
            proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    ready = [json.loads(x) for x in stderr.splitlines() if "engine core ready" in x]
    assert len(ready) == 1, stderr[-2000:]
    assert ready[0]["level"] == "INFO" and ready[0]["logger"] == "gpu_worker.engine.core"
    assert ready[0]["message"].startswith(f"engine core ready: model {SERVED_NAME} on cpu")
