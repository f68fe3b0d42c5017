"""Prometheus metrics: requests through real servers, then a scrape of the real /metrics endpoint."""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from llmserve.telemetry import RouterMetrics, WorkerMetrics, WorkerQueueDepth, start_metrics_server
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.llmserve.telemetry.telemetry_stack import MODEL, Stack

W = "llmserve:"
R = "llmserve:router_"


def scrape(registry: CollectorRegistry) -> list[Sample]:
    """GET /metrics from a real HTTP server on loopback; all samples, parsed."""
    server = start_metrics_server(0, registry, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            text = reply.read().decode()
    finally:
        server.stop()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [x.value for x in samples if x.name == name and x.labels == labels]
    assert len(found) == 1, (name, labels, [x for x in samples if x.name == name])
    return found[0]


def names(samples: list[Sample], name: str) -> list[dict[str, str]]:
    return [x.labels for x in samples if x.name == name]


async def test_scrape_after_requests_counts_what_was_sent(stack: Stack) -> None:
    max_tokens = [1, 2, 3, 4, 5]
    async with stack.channel(stack.router_addr) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for i, n in enumerate(max_tokens):
            request = pb.GenerateRequest(model=MODEL, prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                         request_id=f"r{i}", sampling=pb.SamplingParams(max_tokens=n))
            assert len([c async for c in stub.Generate(request)]) == n + 1

    worker = await asyncio.to_thread(scrape, stack.worker_metrics.registry)
    m = {"model_name": MODEL}
    assert value(worker, W + "prompt_tokens_total", **m) == 3 * len(max_tokens)
    assert value(worker, W + "generation_tokens_total", **m) == sum(max_tokens)
    assert value(worker, W + "request_success_total", model_name=MODEL, finished_reason="length") == 5
    assert value(worker, W + "time_to_first_token_seconds_count", **m) == 5
    assert value(worker, W + "e2e_request_latency_seconds_count", **m) == 5
    assert value(worker, W + "request_queue_time_seconds_count", **m) == 5
    # One inter-token latency per token after the first of each request.
    assert value(worker, W + "inter_token_latency_seconds_count", **m) == sum(n - 1 for n in max_tokens)
    assert value(worker, W + "time_to_first_token_seconds_bucket", model_name=MODEL, le="+Inf") == 5

    router = await asyncio.to_thread(scrape, stack.router_metrics.registry)
    assert value(router, R + "requests_total", model=MODEL, outcome="ok") == 5
    assert value(router, R + "retries_total", model=MODEL) == 5
    assert value(router, R + "routing_decisions_total", policy="prefix", reason="prefix_hit") == 5
    assert value(router, R + "routing_decisions_total", policy="prefix", reason="load") == 5
    assert value(router, R + "request_latency_seconds_count", model=MODEL) == 5
    assert value(router, R + "time_to_first_token_seconds_count", model=MODEL) == 5


@dataclass(frozen=True)
class Stats:
    """Stands for gpu_worker.core.types.SchedulerStats (same field names)."""

    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    device_seconds: float = 0.0


def test_scheduler_stats_become_gauges_and_counter_increments() -> None:
    metrics = WorkerMetrics()
    metrics.update_scheduler_stats("m", Stats(3, 1, 0.25, 100, 40, 1))
    metrics.update_scheduler_stats("m", Stats(2, 0, 0.5, 160, 70, 1))
    samples = scrape(metrics.registry)
    assert value(samples, W + "num_requests_running", model_name="m") == 2
    assert value(samples, W + "num_requests_waiting", model_name="m") == 0
    assert value(samples, W + "kv_cache_usage_perc", model_name="m") == 0.5
    assert value(samples, W + "prefix_cache_queries_total", model_name="m") == 160
    assert value(samples, W + "prefix_cache_hits_total", model_name="m") == 70
    assert value(samples, W + "num_preemptions_total", model_name="m") == 1


def test_engine_counter_reset_counts_the_new_values() -> None:
    metrics = WorkerMetrics()
    metrics.update_scheduler_stats("m", Stats(0, 0, 0.0, 100, 40, 2))
    metrics.update_scheduler_stats("m", Stats(0, 0, 0.0, 30, 10, 0))  # engine restarted
    samples = scrape(metrics.registry)
    assert value(samples, W + "prefix_cache_queries_total", model_name="m") == 130
    assert value(samples, W + "prefix_cache_hits_total", model_name="m") == 50
    assert value(samples, W + "num_preemptions_total", model_name="m") == 2


def test_histogram_buckets_and_sums_are_exact() -> None:
    metrics = WorkerMetrics()
    metrics.on_request_finished("m", prompt_tokens=4, generation_tokens=3, finish_reason="stop",
                                ttft_s=0.003, itl_s=[0.002, 0.5], e2e_s=0.505, queue_s=0.0)
    metrics.on_request_finished("m", prompt_tokens=2, generation_tokens=0, finish_reason="abort")
    samples = scrape(metrics.registry)
    assert value(samples, W + "request_success_total", model_name="m", finished_reason="stop") == 1
    assert value(samples, W + "request_success_total", model_name="m", finished_reason="abort") == 1
    assert value(samples, W + "time_to_first_token_seconds_count", model_name="m") == 1  # abort: none
    assert value(samples, W + "time_to_first_token_seconds_bucket", model_name="m", le="0.001") == 0
    assert value(samples, W + "time_to_first_token_seconds_bucket", model_name="m", le="0.005") == 1
    assert value(samples, W + "inter_token_latency_seconds_bucket", model_name="m", le="0.0025") == 1
    assert value(samples, W + "inter_token_latency_seconds_bucket", model_name="m", le="0.5") == 2
    assert value(samples, W + "inter_token_latency_seconds_sum", model_name="m") == pytest.approx(0.502)
    assert value(samples, W + "prompt_tokens_total", model_name="m") == 6


def test_fleet_gauges_follow_the_registry_view() -> None:
    metrics = RouterMetrics()
    depth = WorkerQueueDepth
    metrics.update_fleet([depth("w0", "a", 2), depth("w1", "a", 0), depth("w2", "b", 5)])
    metrics.update_fleet([depth("w0", "a", 3), depth("w3", "c", 1)])
    samples = scrape(metrics.registry)
    assert sorted(names(samples, R + "live_workers"), key=str) == [{"model": "a"}, {"model": "c"}]
    assert value(samples, R + "live_workers", model="a") == 1
    assert value(samples, R + "worker_load", worker_id="w0", model="a") == 3
    assert value(samples, R + "worker_load", worker_id="w3", model="c") == 1
    assert len(names(samples, R + "worker_load")) == 2


def test_device_seconds_and_their_cost_at_the_configured_price() -> None:
    metrics = WorkerMetrics(device_cost_per_hour=7200.0)  # 2 per device-second
    metrics.update_scheduler_stats("m", Stats(0, 0, 0.0, 0, 0, 0, device_seconds=1.5))
    metrics.update_scheduler_stats("m", Stats(0, 0, 0.0, 0, 0, 0, device_seconds=4.0))
    metrics.update_scheduler_stats("m", Stats(0, 0, 0.0, 0, 0, 0, device_seconds=0.5))  # engine restarted
    samples = scrape(metrics.registry)
    assert value(samples, W + "device_seconds_total", model_name="m") == pytest.approx(4.5)
    assert value(samples, W + "cost_total", model_name="m") == pytest.approx(9.0)
    unpriced = WorkerMetrics()
    unpriced.update_scheduler_stats("m", Stats(0, 0, 0.0, 0, 0, 0, device_seconds=2.0))
    samples = scrape(unpriced.registry)
    assert value(samples, W + "device_seconds_total", model_name="m") == 2.0
    assert names(samples, W + "cost_total") == []  # unknown price: no cost series at all
    with pytest.raises(ValueError, match="device_cost_per_hour"):
        WorkerMetrics(device_cost_per_hour=-1)


def test_standby_gauge_follows_the_registry_view() -> None:
    metrics = RouterMetrics()
    metrics.update_standby({"a": 2, "b": 1})
    metrics.update_standby({"a": 1})  # b's standby promoted itself
    samples = scrape(metrics.registry)
    assert names(samples, R + "standby_workers") == [{"model": "a"}]
    assert value(samples, R + "standby_workers", model="a") == 1
    worker = WorkerMetrics()
    worker.on_standby_promotion("a")
    assert value(scrape(worker.registry), W + "standby_promotions_total", model_name="a") == 1


def test_two_metrics_objects_in_one_process_do_not_collide() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.on_request_finished("m", prompt_tokens=1, generation_tokens=1, finish_reason="stop")
    assert value(scrape(a.registry), W + "generation_tokens_total", model_name="m") == 1
    assert names(scrape(b.registry), W + "generation_tokens_total") == []
