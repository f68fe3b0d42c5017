"""Tracing configuration from OTEL_* variables, the zero-cost off path, the sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmserve.telemetry import RequestTimeline, TracingConfig, setup_tracing
from llmserve.telemetry.spans import NOOP_ROUTER_SPAN, NOOP_WORKER_SPAN, WORKER_GENERATE_SPAN
from llmserve.telemetry.tracing import _otlp_exporter

OFF_PATH_SCRIPT = """
import json, sys
from llmserve.telemetry import (RequestTimeline, RouterMetrics, WorkerMetrics, configure_logging,
                                log_request_finished, setup_tracing)
tracing = setup_tracing("worker")
timeline = RequestTimeline.start()
with tracing.worker_generate(model="m", request_id="r", max_tokens=4) as span:
    timeline.mark_tokens(2)
    timeline.mark_finished()
    span.set_usage(input_tokens=1, output_tokens=2)
    span.record_timeline(timeline)
with tracing.router_generate(model="m", request_id="r", policy="p") as rspan:
    rspan.add_candidate("w", 1.0, 2)
    rspan.set_route("w", "only_candidate")
WorkerMetrics(); RouterMetrics()
print(json.dumps({
    "enabled": tracing.enabled,
    "interceptors": len(tracing.server_interceptors()) + len(tracing.client_interceptors()),
    "trace_id": span.trace_id + rspan.trace_id + tracing.current_trace_id(),
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("opentelemetry", "torch", "gpu_worker")),
}))
"""


def _run_off_path(extra_env: dict[str, str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", OFF_PATH_SCRIPT], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("extra_env", [{}, {"OTEL_TRACES_EXPORTER": "none"},
                                       {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}])
def test_tracing_off_imports_no_opentelemetry_nor_torch(extra_env: dict[str, str]) -> None:
    result = _run_off_path(extra_env)
    assert result == {"enabled": False, "interceptors": 0, "trace_id": "", "modules": []}


def test_config_defaults_to_off() -> None:
    config = TracingConfig.from_env("router", environ={})
    assert config == TracingConfig(service_name="router", exporters=(), protocol="grpc")
    assert not config.enabled


def test_config_reads_otel_variables() -> None:
    config = TracingConfig.from_env("router", environ={
        "OTEL_TRACES_EXPORTER": "otlp, console",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "router-eu-1",
    })
    assert config == TracingConfig(service_name="router-eu-1", exporters=("otlp", "console"),
                                   protocol="http/protobuf")
    traces_protocol = TracingConfig.from_env("w", environ={
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})
    assert traces_protocol.protocol == "grpc"


@pytest.mark.parametrize("environ", [
    {"OTEL_TRACES_EXPORTER": "zipkin"},
    {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
])
def test_config_rejects_unsupported_values(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="OTEL_"):
        TracingConfig.from_env("w", environ=environ)


def test_otlp_exporter_follows_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    http, grpc_ = _otlp_exporter("http/protobuf"), _otlp_exporter("grpc")
    assert isinstance(http, HttpExporter) and isinstance(grpc_, GrpcExporter)
    http.shutdown()
    grpc_.shutdown()


def test_setup_from_env_enables_tracing_and_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "worker-7")
    tracing = setup_tracing("worker")
    try:
        assert tracing.enabled and tracing.service_name == "worker-7"
        assert tracing.tracer_provider is not None
        assert tracing.tracer_provider.resource.attributes["service.name"] == "worker-7"
        assert len(tracing.server_interceptors()) == 1 and len(tracing.client_interceptors()) == 2
    finally:
        tracing.shutdown()  # nothing was recorded: no export is attempted


def test_sampler_from_env_drops_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    tracing = setup_tracing("worker", span_exporter=exporter)
    with tracing.worker_generate(model="m", request_id="r") as span:
        assert not span.is_recording and span.trace_id == ""
        span.record_timeline(RequestTimeline.start())
    assert exporter.get_finished_spans() == ()


def test_span_records_exception_and_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    exporter = InMemorySpanExporter()
    tracing = setup_tracing("worker", span_exporter=exporter)
    with pytest.raises(RuntimeError), tracing.worker_generate(model="m", request_id="r") as span:
        assert span.is_recording and len(span.trace_id) == 32
        assert tracing.current_trace_id() == span.trace_id
        raise RuntimeError("boom")
    (finished,) = exporter.get_finished_spans()
    assert finished.name == WORKER_GENERATE_SPAN
    assert finished.status.description == "RuntimeError: boom"
    assert [e.name for e in finished.events] == ["exception"]
    assert tracing.current_trace_id() == ""


def test_disabled_spans_are_shared_no_ops() -> None:
    tracing = setup_tracing("w") if "OTEL_TRACES_EXPORTER" not in os.environ else None
    if tracing is None:
        pytest.skip("OTEL_TRACES_EXPORTER is set in this environment")
    assert tracing.worker_generate(model="m", request_id="r") is NOOP_WORKER_SPAN
    assert tracing.router_generate(model="m", request_id="r", policy="p") is NOOP_ROUTER_SPAN
