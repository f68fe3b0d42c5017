"""deploy/k8s: every rendered manifest validates offline, and the pieces fit together."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.deploy_manifests import (
    DRAIN_COMMAND,
    KUSTOMIZE_TARGETS,
    containers,
    env_refs,
    find,
    image_repository,
    image_tag,
    our_dockerfile_for_image,
    render_kustomize,
)

# Oldest version the manifests target (native gRPC probes: 1.27; preStop `sleep` action: 1.30),
# the version the deployment docs are checked against, and the newest schema set
# kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")
# API groups of custom resources (no schema in kubernetes-validate): tests/deploy/test_autoscaling.py
# checks them against the fields their projects document.
CUSTOM_RESOURCE_GROUPS = ("keda.sh/",)
# Resources that belong to other namespaces on purpose: the Prometheus adapter's rules live beside it.
OTHER_NAMESPACES = {("ConfigMap", "llmserve-prometheus-adapter"): "monitoring"}

Resources = tuple[dict[str, Any], ...]


def _container(resource: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in containers(resource) if c["name"] == name)


def _arg(container: dict[str, Any], flag: str) -> str:
    values = [a.split("=", 1)[1] for a in container.get("args", []) if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} given {len(values)} times in {container['args']}"
    return values[0]


def _port(container: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


@pytest.fixture(scope="module", params=KUSTOMIZE_TARGETS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, Resources]:
    return request.param, render_kustomize(request.param)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schema(
    rendered: tuple[str, Resources], version: str
) -> None:
    target, resources = rendered
    assert len(resources) >= 10, f"{target}: only {len(resources)} resources rendered"
    for res in resources:
        name = f"{target}: {res['kind']}/{res['metadata']['name']}"
        if res["apiVersion"].startswith(CUSTOM_RESOURCE_GROUPS):
            continue
        try:
            kubernetes_validate.validate(res, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_the_validator_rejects_a_misspelled_field() -> None:
    worker = copy.deepcopy(find(render_kustomize("base"), "Deployment", "llmserve-worker"))
    _container(worker, "worker")["readinessProbe"]["grcp"] = {"port": 50061}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[0], strict=True)


def test_expected_resources_exist(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    for kind, name in [
        ("Deployment", "llmserve-router"), ("Service", "llmserve-router"),
        ("HorizontalPodAutoscaler", "llmserve-router"), ("PodDisruptionBudget", "llmserve-router"),
        ("Deployment", "llmserve-worker"), ("Service", "llmserve-worker"),
        ("PodDisruptionBudget", "llmserve-worker"),
        ("Deployment", "llmserve-redis"), ("Service", "llmserve-redis"),
        ("ConfigMap", "llmserve-config"),
    ]:
        find(resources, kind, name)
    for r in resources:
        expected = OTHER_NAMESPACES.get((r["kind"], r["metadata"]["name"]), "llmserve")
        assert r["metadata"].get("namespace", "llmserve") == expected, r["metadata"]


def test_selectors_match_their_pods(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    pod_labels = [r["spec"]["template"]["metadata"]["labels"] for r in resources if r["kind"] == "Deployment"]
    for res in resources:
        selector = None
        if res["kind"] == "Deployment":
            selector = res["spec"]["selector"]["matchLabels"]
            assert selector.items() <= res["spec"]["template"]["metadata"]["labels"].items()
        elif res["kind"] == "Service":
            selector = res["spec"]["selector"]
        elif res["kind"] == "PodDisruptionBudget":
            selector = res["spec"]["selector"]["matchLabels"]
        if selector is not None:
            matches = [labels for labels in pod_labels if selector.items() <= labels.items()]
            assert len(matches) == 1, f"{res['kind']}/{res['metadata']['name']} selects {len(matches)} pods"


def test_hpa_scales_the_router_deployment(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    hpa = find(resources, "HorizontalPodAutoscaler", "llmserve-router")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "llmserve-router")
    router = find(resources, "Deployment", "llmserve-router")
    assert "replicas" not in router["spec"], "the HPA owns replicas"
    assert hpa["spec"]["minReplicas"] >= 2
    assert _container(router, "router")["resources"]["requests"]["cpu"], "CPU utilisation needs requests"


def test_service_target_ports_exist(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    deployments = [r for r in resources if r["kind"] == "Deployment"]
    for svc in (r for r in resources if r["kind"] == "Service"):
        pod = next(d for d in deployments
                   if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items())
        port_names = {p["name"] for c in containers(pod) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service/{svc['metadata']['name']}: {port}"


def test_env_references_and_config_map_refs_resolve(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    config_maps = {r["metadata"]["name"]: r["data"] for r in resources if r["kind"] == "ConfigMap"}
    for res in resources:
        for c in containers(res):
            defined: set[str] = set()
            for source in c.get("envFrom", []):
                name = source["configMapRef"]["name"]
                assert name in config_maps, f"{res['metadata']['name']}: no ConfigMap {name}"
                defined |= set(config_maps[name])
            for var in c.get("env", []):
                for ref in env_refs(var.get("value", "")):
                    assert ref in defined, f"{var['name']} uses $({ref}) before it is defined"
                defined.add(var["name"])
            for arg in list(c.get("command", [])) + list(c.get("args", [])):
                for ref in env_refs(arg):
                    assert ref in defined, f"{res['metadata']['name']}: {arg} uses undefined $({ref})"


def test_images_are_built_from_this_repo_or_pinned_public_ones(rendered: tuple[str, Resources]) -> None:
    target, resources = rendered
    for res in resources:
        for c in containers(res):
            image = c["image"]
            assert image_tag(image) not in (None, "latest"), f"{image} is not pinned"
            dockerfile = our_dockerfile_for_image(image)
            if dockerfile is None:
                assert image_repository(image) == "redis", f"unexpected public image {image}"
            else:
                assert dockerfile.is_file(), f"{image}: {dockerfile} missing"
    worker_image = _container(find(resources, "Deployment", "llmserve-worker"), "worker")["image"]
    expected = "-cpu" if target in ("base", "overlays/cpu") else "-cuda"
    assert str(image_tag(worker_image)).endswith(expected)


def test_worker_probes_use_native_grpc_health_on_the_serving_port(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    worker = _container(find(resources, "Deployment", "llmserve-worker"), "worker")
    grpc_port = _port(worker, "grpc")
    assert int(_arg(worker, "--port")) == grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == grpc_port, probe
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading needs minutes"
    router = _container(find(resources, "Deployment", "llmserve-router"), "router")
    for probe in ("readinessProbe", "livenessProbe"):
        assert router[probe]["grpc"]["port"] == _port(router, "grpc") == int(_arg(router, "--port"))


def test_router_grace_period_covers_prestop_and_drain(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    pod = find(resources, "Deployment", "llmserve-router")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"]]
    pre_stop_s = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop_s >= 5, "let endpoint removal propagate before SIGTERM"
    drain_s = float(_arg(c, "--drain-grace-s"))
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 10


# After its grace period the worker aborts leftover streams and gives them this long to end
# (gpu_worker/server/server.py, _ABORT_WAIT_S) before it stops.
WORKER_ABORT_WAIT_S = 5


def test_worker_pre_stop_drains_within_the_grace_period(rendered: tuple[str, Resources]) -> None:
    """The hook drains through WorkerControl.Drain on the serving port (llmserve-drain); the pod's
    grace period covers the drain, the abort wait and a margin, so SIGKILL never cuts a stream
    the drain was still allowed to finish (tests/deploy/test_drain_script.py runs the hook)."""
    _, resources = rendered
    pod = find(resources, "Deployment", "llmserve-worker")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"]]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == DRAIN_COMMAND
    assert command[1] == f"127.0.0.1:{_port(c, 'grpc')}"
    assert not any(a.startswith("--grace-s") for a in command), "use the worker's own --drain-grace-s"
    drain_s = float(_arg(c, "--drain-grace-s"))
    assert pod["terminationGracePeriodSeconds"] >= drain_s + WORKER_ABORT_WAIT_S + 10


def test_worker_advertises_its_pod_ip(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    worker = _container(find(resources, "Deployment", "llmserve-worker"), "worker")
    pod_ip = next(e for e in worker["env"] if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert _arg(worker, "--advertise-address") == f"$(POD_IP):{_port(worker, 'grpc')}"
    headless = find(resources, "Service", "llmserve-worker")
    assert headless["spec"]["clusterIP"] == "None"


def test_components_find_redis_through_the_config_map(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    config = find(resources, "ConfigMap", "llmserve-config")["data"]
    redis_service = find(resources, "Service", "llmserve-redis")
    assert config["LLMSERVE_REDIS_URL"] == f"redis://llmserve-redis:{redis_service['spec']['ports'][0]['port']}/0"
    for name, container in [("llmserve-router", "router"), ("llmserve-worker", "worker")]:
        assert _arg(_container(find(resources, "Deployment", name), container), "--redis-url") == \
            "$(LLMSERVE_REDIS_URL)"


@pytest.mark.parametrize("name,container", [("llmserve-router", "router"), ("llmserve-worker", "worker")])
def test_telemetry_env_and_scrape_annotations(
    rendered: tuple[str, Resources], name: str, container: str
) -> None:
    _, resources = rendered
    deployment = find(resources, "Deployment", name)
    c = _container(deployment, container)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _port(c, "metrics") == int(_arg(c, "--metrics-port"))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OTEL_SERVICE_NAME"] == name
    config = find(resources, "ConfigMap", "llmserve-config")["data"]
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    assert config["OTEL_TRACES_EXPORTER"] == "otlp", "tracing is off unless an exporter is named"


def test_pods_run_as_non_root(rendered: tuple[str, Resources]) -> None:
    _, resources = rendered
    for res in (r for r in resources if r["kind"] == "Deployment"):
        assert res["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in containers(res):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not() -> None:
    def worker(target: str) -> dict[str, Any]:
        return _container(find(render_kustomize(target), "Deployment", "llmserve-worker"), "worker")

    gpu = worker("overlays/gpu")
    resources = gpu["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert _arg(gpu, "--device") == "cuda"
    cpu = worker("overlays/cpu")
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert _arg(cpu, "--device") == "cpu"
    assert _arg(cpu, "--model") == "smollm2-135m"
