"""Worker autoscaling on queue depth (deploy/k8s/components): the HPA + Prometheus adapter rules, the
KEDA ScaledObject alternative, and the pieces they rely on (one autoscaler per Deployment, the drain
hook in the image). The HPA, the adapter's ConfigMap and the rest validate against the Kubernetes
schemas in test_k8s_manifests.py; the ScaledObject, a custom resource without a schema there, is
checked here against the fields of KEDA's v1alpha1 API. The queries themselves run against a real
Prometheus in test_dashboards_live.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.deploy_manifests import (
    DEPLOY,
    DRAIN_COMMAND,
    containers,
    dockerfile_copies,
    find,
    our_dockerfile_for_image,
    render_kustomize,
)
from tests.deploy.promql import selectors

HPA_TARGET = "overlays/gpu-autoscale-hpa"
KEDA_TARGET = "overlays/gpu-autoscale-keda"
WAITING = "llmserve:num_requests_waiting"

# Fields of KEDA's keda.sh/v1alpha1 ScaledObject (the Go API types its CRD is generated from,
# github.com/kedacore/keda/v2/apis/keda/v1alpha1, as published in @kubernetes-models/keda 2.0.0).
KEDA_SPEC_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                    "triggers"}
KEDA_SCALE_TARGET_FIELDS = {"apiVersion", "kind", "name", "envSourceContainerName"}
KEDA_ADVANCED_FIELDS = {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}
KEDA_HPA_CONFIG_FIELDS = {"name", "behavior"}
KEDA_TRIGGER_FIELDS = {"type", "name", "metadata", "metricType", "useCachedMetrics", "authenticationRef"}
# The Prometheus scaler's metadata keys (KEDA docs, scalers/prometheus): all values are strings.
KEDA_PROMETHEUS_METADATA = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                            "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl", "timeout",
                            "authModes"}


def _worker(target: str) -> dict[str, Any]:
    return find(render_kustomize(target), "Deployment", "llmserve-worker")


def _served_model(target: str) -> str:
    (c,) = containers(_worker(target))
    return next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--served-model-name="))


def _adapter_rules() -> list[dict[str, Any]]:
    config_map = find(render_kustomize(HPA_TARGET), "ConfigMap", "llmserve-prometheus-adapter")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert set(config) <= {"rules", "externalRules", "resourceRules"}, set(config)
    return list(config["rules"])


def _adapter_metric_name(rule: dict[str, Any], series: str) -> str:
    """The custom metric name the adapter gives ``series`` (Go's ``${1}`` as Python's ``\\1``)."""
    replacement = re.sub(r"\$\{(\d+)\}", r"\\\1", rule["name"]["as"])
    return re.sub(rule["name"]["matches"], replacement, series)


@pytest.mark.parametrize("target", ["base", "overlays/cpu", "overlays/gpu", HPA_TARGET, KEDA_TARGET])
def test_one_autoscaler_or_a_fixed_size_per_worker_deployment(target: str) -> None:
    resources = render_kustomize(target)
    scalers = [r for r in resources if r["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
               and r["spec"]["scaleTargetRef"]["name"] == "llmserve-worker"]
    worker = _worker(target)
    if target in (HPA_TARGET, KEDA_TARGET):
        assert len(scalers) == 1, "two autoscalers on one Deployment fight over its replicas"
        assert scalers[0]["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert scalers[0]["metadata"]["namespace"] == worker["metadata"].get("namespace", "llmserve")
        assert "replicas" not in worker["spec"], "the autoscaler owns replicas"
    else:
        assert scalers == [] and worker["spec"]["replicas"] >= 2


def test_hpa_scales_workers_on_the_adapters_queue_depth_metric() -> None:
    hpa = find(render_kustomize(HPA_TARGET), "HorizontalPodAutoscaler", "llmserve-worker")
    spec = hpa["spec"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    (rule,) = _adapter_rules()
    (series,) = selectors(rule["seriesQuery"])
    assert series.metric == WAITING
    assert metric["pods"]["metric"]["name"] == _adapter_metric_name(rule, series.metric)
    assert 2 <= spec["minReplicas"] <= spec["maxReplicas"]
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0, "model loads are slow: start early"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300, "draining is slow: wait"


def test_adapter_rule_maps_series_to_pods_and_fills_every_template_field() -> None:
    (rule,) = _adapter_rules()
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    (series,) = selectors(rule["seriesQuery"])
    assert {m.label for m in series.matchers} == {"namespace", "pod"}, "only series the adapter can map"
    query = rule["metricsQuery"]
    for field in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert field in query, f"metricsQuery lacks {field}"
    rendered = (query.replace("<<.Series>>", series.metric)
                .replace("<<.LabelMatchers>>", 'namespace="llmserve",pod=~"a|b"')
                .replace("<<.GroupBy>>", "pod"))
    (used,) = selectors(rendered)
    assert used.metric == WAITING and used.function != "rate", "a gauge: never under rate()"


def test_keda_scaled_object_has_only_documented_fields() -> None:
    scaled = find(render_kustomize(KEDA_TARGET), "ScaledObject", "llmserve-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert set(scaled) == {"apiVersion", "kind", "metadata", "spec"}
    spec = scaled["spec"]
    assert set(spec) <= KEDA_SPEC_FIELDS, set(spec) - KEDA_SPEC_FIELDS
    assert set(spec["scaleTargetRef"]) <= KEDA_SCALE_TARGET_FIELDS
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": "llmserve-worker"}
    for key in ("pollingInterval", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[key], int) and spec[key] > 0, key
    assert 2 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec["advanced"]) <= KEDA_ADVANCED_FIELDS
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) <= KEDA_HPA_CONFIG_FIELDS
    for trigger in spec["triggers"]:
        assert set(trigger) <= KEDA_TRIGGER_FIELDS, set(trigger) - KEDA_TRIGGER_FIELDS
        assert isinstance(trigger["metadata"], dict)
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata are strings"


def test_keda_behavior_is_a_valid_hpa_behavior() -> None:
    """KEDA copies ``advanced.horizontalPodAutoscalerConfig.behavior`` into the HPA it creates: it must
    validate as an autoscaling/v2 behavior (checked inside a copy of our own HPA)."""
    scaled = find(render_kustomize(KEDA_TARGET), "ScaledObject", "llmserve-worker")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = copy.deepcopy(find(render_kustomize(HPA_TARGET), "HorizontalPodAutoscaler", "llmserve-worker"))
    hpa["spec"]["behavior"] = behavior
    kubernetes_validate.validate(hpa, "1.33.0", strict=True)
    assert behavior == find(render_kustomize(HPA_TARGET), "HorizontalPodAutoscaler",
                            "llmserve-worker")["spec"]["behavior"], "both alternatives should behave alike"


def test_keda_prometheus_trigger_queries_this_models_waiting_requests() -> None:
    scaled = find(render_kustomize(KEDA_TARGET), "ScaledObject", "llmserve-worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert {"serverAddress", "query", "threshold"} <= set(meta) <= KEDA_PROMETHEUS_METADATA
    assert re.fullmatch(r"https?://[a-z0-9.-]+(:\d+)?", meta["serverAddress"]), meta["serverAddress"]
    assert float(meta["threshold"]) > 0
    (used,) = selectors(meta["query"])
    assert used.metric == WAITING
    labels = {m.label: (m.op, m.value) for m in used.matchers}
    assert labels["model_name"] == ("=", _served_model(KEDA_TARGET)), "scale on this Deployment's model"
    assert labels["namespace"] == ("=", scaled["metadata"]["namespace"])


@pytest.mark.parametrize("target", [HPA_TARGET, KEDA_TARGET])
def test_scale_down_drains_through_the_hook_the_image_ships(target: str) -> None:
    (c,) = containers(_worker(target))
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == DRAIN_COMMAND
    dockerfile = our_dockerfile_for_image(c["image"])
    assert dockerfile is not None
    copies = {cp.dest: cp.sources for cp in dockerfile_copies(dockerfile)}
    assert copies.get(f"/usr/local/bin/{DRAIN_COMMAND}") == ("deploy/drain_worker.py",)
    pdb = find(render_kustomize(target), "PodDisruptionBudget", "llmserve-worker")
    assert pdb["spec"]["maxUnavailable"] == 1, "evictions drain one worker at a time"


def test_components_are_kustomize_components() -> None:
    for name in ("autoscale-prometheus-adapter", "autoscale-keda"):
        path = DEPLOY / "k8s" / "components" / name / "kustomization.yaml"
        kustomization = yaml.safe_load(path.read_text())
        assert kustomization["kind"] == "Component"
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
