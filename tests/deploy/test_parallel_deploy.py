"""The two-GPU (tensor-parallel) worker deployments: the Kubernetes overlay and the Compose override."""

from __future__ import annotations

import json

from tests.deploy.deploy_manifests import COMPOSE_FILE, DEPLOY, compose_config, find, render_kustomize


def test_k8s_tp2_overlay_asks_for_two_gpus_and_shared_memory() -> None:
    worker = find(render_kustomize("overlays/gpu-tp2"), "Deployment", "llmserve-worker")
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "--tensor-parallel-size=2" in container["args"] and "--device=cuda" in container["args"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "NCCL_NVLS_ENABLE", "value": "0"} in container["env"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_compose_tp2_override_renders_one_worker_on_two_gpus() -> None:
    result = compose_config("-f", str(DEPLOY / "compose.tp2.yaml"), "--profile", "gpu", file=COMPOSE_FILE)
    assert result.returncode == 0, result.stderr
    worker = json.loads(result.stdout)["services"]["worker-gpu"]
    assert "--tensor-parallel-size=2" in worker["command"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert worker["environment"]["NCCL_NVLS_ENABLE"] == "0"
    assert int(worker["shm_size"]) >= 16 * 2**30
