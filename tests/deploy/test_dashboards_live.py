"""Every dashboard panel and alert rule against a live stack: a real router and worker (tiny llama,
sharing the in-process fleet store of ``llmserve up``), a real Prometheus scraping both every second.

Two checks, for every query of every panel (and every alert rule, the dashboard variable, the
autoscalers' queries):
- by name: each metric a query selects is in a scrape of the two ``/metrics`` endpoints, with
  samples and with the labels the query matches or groups on; ``rate`` only ever sees counters or
  histogram buckets, and a counter is never graphed raw;
- by value: Prometheus runs the query (Grafana's variables filled in as its "All" default does)
  and returns at least one finite value. Alert rules evaluate without error.
Traffic comes in two rounds so that every counter has grown between scrapes: a fresh prompt
homed on a registered but dead worker (a retry), a repeated prompt (a prefix-cache hit), an
unknown model (an error outcome). A warm standby is registered (a publisher heartbeating a
standby record: routers count it, never dial it), and the worker has a device price, so the
standby and cost panels have data.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import yaml

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet import LoadReport, MemoryStateStore, WorkerIdentity, WorkerPublisher, WorkerRecord
from llmserve.hashing import block_hashes
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from router.policy import rendezvous
from router.server import RouterConfig, RouterServer
from tests.deploy.deploy_manifests import containers, find, render_kustomize
from tests.deploy.monitoring import (
    ALERTS_FILE,
    Exposition,
    Query,
    alert_queries,
    all_panel_queries,
    dashboard_files,
    substitute_variables,
    variable_queries,
)
from tests.deploy.prometheus_server import PrometheusServer
from tests.deploy.promql import grouping_labels, selectors
from tests.helpers.redis_server import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 16
WORKER_ID = "live-worker"
DEAD_ID = "live-dead"  # registered in Redis, nothing listens: the router retries elsewhere
STANDBY_ID = "live-standby"  # a registered warm standby (never dialed)
WORKER_POD = "llmserve-worker-0"  # the pod label Kubernetes service discovery would add
RATE_FUNCTIONS = {"rate", "irate", "increase"}
COUNTER_FUNCTIONS = RATE_FUNCTIONS | {"resets", "changes"}
# Labels Prometheus attaches from the target rather than the exposition (the last two on Kubernetes).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}


def _keda_query_and_model() -> tuple[str, str]:
    """The KEDA trigger's query, and the model name its Deployment serves (the live worker uses it)."""
    resources = render_kustomize("overlays/gpu-autoscale-keda")
    (trigger,) = find(resources, "ScaledObject", "llmserve-worker")["spec"]["triggers"]
    (worker,) = containers(find(resources, "Deployment", "llmserve-worker"))
    model = next(a.split("=", 1)[1] for a in worker["args"] if a.startswith("--served-model-name="))
    return trigger["metadata"]["query"], model


KEDA_QUERY, MODEL = _keda_query_and_model()


def _adapter_query() -> str:
    """The Prometheus adapter's metricsQuery as the adapter renders it for the HPA of one pod."""
    config_map = find(render_kustomize("overlays/gpu-autoscale-hpa"), "ConfigMap",
                      "llmserve-prometheus-adapter")
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    (series,) = selectors(rule["seriesQuery"])
    return (rule["metricsQuery"].replace("<<.Series>>", series.metric)
            .replace("<<.LabelMatchers>>", f'namespace="llmserve",pod=~"{WORKER_POD}"')
            .replace("<<.GroupBy>>", "pod"))


def _every_query() -> list[Query]:
    return (all_panel_queries() + alert_queries() + [Query("KEDA trigger", KEDA_QUERY),
                                                     Query("Prometheus adapter rule", _adapter_query())])


@dataclass
class Stack:
    router: RouterServer
    worker: WorkerServer
    prometheus: PrometheusServer


def _prompt_homed_on(worker_id: str, other: str, rng: random.Random) -> list[int]:
    """Fresh token ids (3 blocks) whose first block ranks ``worker_id`` first under the prefix policy."""
    while True:
        ids = [rng.randrange(100, 40000) for _ in range(3 * BLOCK + 5)]
        first = block_hashes(ids, BLOCK, seed=MODEL)[0]
        if rendezvous(first, worker_id) > rendezvous(first, other):
            return ids


async def _generate(target: str, ids: list[int], model: str = MODEL) -> None:
    request = pb.GenerateRequest(model=model, prompt_token_ids=pb.TokenIds(ids=ids),
                                 sampling=pb.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    async with grpc.aio.insecure_channel(target) as channel:
        chunks = [c async for c in pb_grpc.GenerationStub(channel).Generate(request, timeout=60)]
    assert chunks[-1].finish_reason == "length"


async def _unknown_model(target: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(target, [1, 2, 3], model="no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def _round(stack: Stack, rng: random.Random, repeat: list[int]) -> None:
    """One round of traffic: a retry, a prefix-cache hit, a fresh prompt, an unknown model."""
    target = stack.router.target
    await _generate(target, _prompt_homed_on(DEAD_ID, WORKER_ID, rng))  # dead worker first: a retry
    await _generate(target, repeat)
    await _generate(target, _prompt_homed_on(WORKER_ID, DEAD_ID, rng))
    await _unknown_model(target)


async def _until_prometheus_sees(prometheus: PrometheusServer, expr: str, at_least: float) -> None:
    """Wait (bounded) until a scrape has brought ``expr`` up to ``at_least``."""
    deadline = time.monotonic() + 60
    while prometheus.scalar_sum(expr) < at_least:
        if time.monotonic() > deadline:
            targets = [(t["scrapeUrl"], t["health"], t["lastError"])
                       for t in prometheus.api("targets")["activeTargets"]]
            raise AssertionError(f"Prometheus never saw {expr} >= {at_least}; targets: {targets}")
        await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    # The fleet store only carries the registry here; Redis itself is exercised by tests/router and
    # tests/deploy/test_drain_script.py.
    store = MemoryStateStore()
    port = free_port()
    engine = EngineConfig(model=str(tiny_model("llama")), served_model_name=MODEL, device="cpu",
                          num_kv_blocks=64, max_num_seqs=4, block_size=BLOCK)
    worker = WorkerServer(engine, ServerConfig(port=port, advertise_address=f"127.0.0.1:{port}",
                                               worker_id=WORKER_ID, metrics_port=0, drain_grace_s=0.5,
                                               stats_interval_s=0.2, device_cost_per_hour=2.69),
                          fleet_store=store)
    router = RouterServer(RouterConfig(port=0, registry_cache_s=0.05, metrics_port=0), store)
    standby = WorkerPublisher(
        store, WorkerIdentity(STANDBY_ID, MODEL, f"127.0.0.1:{free_port()}", BLOCK, 1024),
        load_fn=LoadReport, kv_events_fn=list, cached_hashes_fn=_no_hashes, standby=True)
    prometheus: PrometheusServer | None = None
    try:
        await worker.start()
        await worker.wait_ready()
        dead = WorkerRecord(DEAD_ID, MODEL, f"127.0.0.1:{free_port()}", BLOCK, 1024, heartbeat_at=time.time())
        await store.heartbeat(dead, ttl_s=600)
        await standby.start()
        await router.start()
        prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"), [
            {"job_name": "llmserve-router",
             "static_configs": [{"targets": [f"127.0.0.1:{router.metrics_port}"]}]},
            {"job_name": "llmserve-worker", "static_configs": [{
                "targets": [f"127.0.0.1:{worker.metrics_port}"],
                "labels": {"namespace": "llmserve", "pod": WORKER_POD}}]},
        ], [ALERTS_FILE])
        prometheus.start()
        live = Stack(router, worker, prometheus)
        rng, repeat = random.Random(7), _prompt_homed_on(WORKER_ID, DEAD_ID, random.Random(8))
        for rounds in (1, 2):  # every counter grows between two scrapes
            await _round(live, rng, repeat)
            await _until_prometheus_sees(prometheus, "sum(llmserve:router_requests_total)", 4 * rounds)
            await _until_prometheus_sees(prometheus, "sum(llmserve:request_success_total)", 3 * rounds)
        yield live
    finally:
        if prometheus is not None:
            prometheus.stop()
        await standby.stop()
        await router.stop(grace_s=0.5)
        await worker.drain(0.5)


async def _no_hashes() -> set[bytes]:
    return set()


def _scrape(port: int | None) -> str:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _problems(query: Query, exposition: Exposition) -> list[str]:
    """What is wrong with the metric names and labels ``query`` uses, given a scrape."""
    problems = []
    selected = selectors(query.expr)
    names = {s.metric for s in selected}
    known_labels = set(TARGET_LABELS)
    for sel in selected:
        if not exposition.samples.get(sel.metric):
            problems.append(f"{sel.metric} is not in the scrape")
            continue
        kind, labels = exposition.types[sel.metric], exposition.label_names(sel.metric)
        known_labels |= labels
        if sel.function in RATE_FUNCTIONS and kind not in ("counter", "histogram"):
            problems.append(f"{sel.function}() over {sel.metric}, a {kind}")
        if kind == "counter" and sel.function not in COUNTER_FUNCTIONS:
            problems.append(f"counter {sel.metric} used raw (in {sel.function}())")
        if sel.metric.endswith("_bucket") and sel.function not in RATE_FUNCTIONS:
            problems.append(f"histogram buckets {sel.metric} without rate()")
        for m in sel.matchers:
            if m.label not in labels | TARGET_LABELS:
                problems.append(f"{sel.metric} has no label {m.label!r} (has {sorted(labels)})")
    for label in grouping_labels(query.expr):
        if label not in known_labels:
            problems.append(f"grouping label {label!r} is on none of {sorted(names)}")
    return problems


async def test_every_metric_a_query_uses_is_exported_with_its_labels(stack: Stack) -> None:
    exposition = Exposition.parse(_scrape(stack.router.metrics_port), _scrape(stack.worker.metrics_port))
    queries = _every_query()
    for path in dashboard_files():
        queries += [Query(f"{path.name}: variable {name}", f"{selector}{{}}")
                    for name, selector, _ in variable_queries(path) if selector]
    assert len(queries) > 40
    problems = {q.where: p for q in queries if (p := _problems(q, exposition))}
    assert not problems, "\n".join(f"{where}: {p}" for where, p in problems.items())


@pytest.mark.parametrize("query", [*all_panel_queries(), Query("KEDA trigger", KEDA_QUERY),
                                   Query("Prometheus adapter rule", _adapter_query())], ids=lambda q: q.where)
async def test_query_returns_data_from_the_live_stack(stack: Stack, query: Query) -> None:
    expr = substitute_variables(query.expr, {"model": ".*"})  # Grafana's "All"
    result = stack.prometheus.query(expr)
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"{query.where}: {expr} returned {result}"


async def test_adapter_query_returns_one_value_per_pod(stack: Stack) -> None:
    result = stack.prometheus.query(_adapter_query())
    assert [r["metric"] for r in result] == [{"pod": WORKER_POD}]


async def test_model_variable_lists_the_served_model(stack: Stack) -> None:
    for path in dashboard_files():
        for name, selector, label in variable_queries(path):
            values = stack.prometheus.api(f"label/{label}/values", **{"match[]": str(selector)})
            assert MODEL in values, f"{path.name}: ${name} offers {values}"


async def test_alert_rules_evaluate_without_error_and_stay_quiet(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while True:
        rules = [r for g in stack.prometheus.api("rules")["groups"] for r in g["rules"]]
        if rules and all(r["lastEvaluation"] > "2000" for r in rules):
            break
        assert time.monotonic() < deadline, "rules never evaluated"
        await asyncio.sleep(0.2)
    assert {r["name"] for r in rules} == {q.where.removeprefix("alert ") for q in alert_queries()}
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        assert rule["state"] == "inactive", f"{rule['name']} fires on a healthy stack: {rule['alerts']}"
