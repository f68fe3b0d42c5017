"""deploy/compose.yaml: parses, and references only our images, public ones, and files that exist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_manifests import (
    COMPOSE_FILE,
    DEPLOY,
    HEALTHCHECK_COMMAND,
    PUBLIC_IMAGES,
    ROOT,
    compose_build_context,
    compose_config,
    compose_dockerfile,
    compose_services,
    dockerfile_copies,
    image_repository,
    image_tag,
    load_compose,
)


def _args(service: dict[str, Any]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in service["command"] if "=" in a)


def test_compose_parses_with_the_expected_services() -> None:
    services = compose_services()
    expected = {"redis", "router-1", "router-2", "worker-cpu", "worker-gpu", "otel-collector", "jaeger"}
    assert expected <= set(services)
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    for name in ("redis", "router-1", "router-2", "otel-collector", "jaeger"):
        assert "profiles" not in services[name], f"{name} must run in every profile"


@pytest.mark.parametrize("profile,worker", [("cpu", "worker-cpu"), ("gpu", "worker-gpu")])
def test_docker_compose_validates_each_profile(profile: str, worker: str) -> None:
    """Docker Compose's own loader (compose-go, the same code as `docker compose config`)."""
    result = compose_config("--profile", profile)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert worker in services
    (other,) = {"worker-cpu", "worker-gpu"} - {worker}
    assert other not in services, f"{other} must not run in the {profile} profile"
    assert {"redis", "router-1", "router-2", "otel-collector", "jaeger"} <= set(services)


def test_docker_compose_rejects_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: redis:7.4-alpine\n    healthchek: {}\n")
    result = compose_config(file=bad)
    assert result.returncode != 0 and "healthchek" in result.stderr


def test_images_are_ours_or_pinned_public_ones() -> None:
    for name, svc in compose_services().items():
        dockerfile = compose_dockerfile(svc)
        if dockerfile is not None:
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            assert compose_build_context(svc) == ROOT, f"{name}: build context must be the repo root"
            assert dockerfile.parent == DEPLOY
        else:
            image = svc["image"]
            assert image_repository(image) in PUBLIC_IMAGES, f"{name}: unknown image {image}"
            assert image_tag(image) not in (None, "latest"), f"{name}: pin {image}"


def test_build_args_are_declared_in_the_dockerfile() -> None:
    for name, svc in compose_services().items():
        dockerfile = compose_dockerfile(svc)
        build_args = (svc.get("build") or {}).get("args", {}) if isinstance(svc.get("build"), dict) else {}
        if dockerfile is None or not build_args:
            continue
        declared = {line.split()[1].split("=")[0] for line in dockerfile.read_text().splitlines()
                    if line.startswith("ARG ")}
        assert set(build_args) <= declared, f"{name}: {set(build_args) - declared} not declared"


def test_depends_on_names_real_services() -> None:
    services = compose_services()
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name} depends on unknown {dep}"
            if isinstance(deps, dict) and deps[dep].get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which has none"


def test_our_services_check_health_through_grpc_health() -> None:
    for name, svc in compose_services().items():
        dockerfile = compose_dockerfile(svc)
        if dockerfile is None:
            continue
        test = svc["healthcheck"]["test"]
        assert test[:2] == ["CMD", HEALTHCHECK_COMMAND], f"{name}: {test}"
        port = _args(svc)["--port"]
        assert test[2] == f"127.0.0.1:{port}", f"{name} probes {test[2]} but serves on {port}"
        dest = f"/usr/local/bin/{HEALTHCHECK_COMMAND}"
        assert any(c.dest == dest for c in dockerfile_copies(dockerfile)), f"{dockerfile.name} lacks {dest}"


def test_workers_advertise_their_service_name_and_drain_within_stop_grace() -> None:
    for name in ("worker-cpu", "worker-gpu"):
        svc = compose_services()[name]
        args = _args(svc)
        assert args["--advertise-address"] == f"{name}:{args['--port']}"
        assert args["--redis-url"] == "redis://redis:6379/0"
        grace_s = int(str(svc["stop_grace_period"]).rstrip("s"))
        assert grace_s > float(args["--drain-grace-s"])
    assert _args(compose_services()["worker-cpu"])["--model"] == "smollm2-135m"
    assert _args(compose_services()["worker-cpu"])["--device"] == "cpu"


def test_gpu_worker_reserves_a_gpu() -> None:
    devices = compose_services()["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in compose_services()["worker-cpu"]


def test_two_routers_on_distinct_host_ports() -> None:
    services = compose_services()
    host_ports = [p.split(":")[-2] for n in ("router-1", "router-2") for p in services[n]["ports"]]
    assert len(set(host_ports)) == 2
    for name in ("router-1", "router-2"):
        args = _args(services[name])
        assert args["--redis-url"] == "redis://redis:6379/0"
        assert int(str(services[name]["stop_grace_period"]).rstrip("s")) > float(args["--drain-grace-s"])


def test_telemetry_goes_to_the_collector_and_on_to_jaeger() -> None:
    services = compose_services()
    for name, svc in services.items():
        if compose_dockerfile(svc) is not None:
            env = svc["environment"]
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317", name
            assert env["OTEL_TRACES_EXPORTER"] == "otlp", f"{name}: tracing is off by default"
            assert env["OTEL_SERVICE_NAME"].startswith("llmserve-"), name
    collector = services["otel-collector"]
    mounts = [v.split(":") for v in collector["volumes"]]
    (config_src, config_dst, _) = next(m for m in mounts if m[0].endswith(".yaml"))
    config_path = (COMPOSE_FILE.parent / config_src).resolve()
    assert config_path.is_file(), f"{config_src} missing"
    assert any(config_dst in c for c in collector["command"])

    config = yaml.safe_load(config_path.read_text())
    for pipeline in config["service"]["pipelines"].values():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in config[section], f"{component} not defined in {section}"
    jaeger_endpoint = config["exporters"]["otlp/jaeger"]["endpoint"]
    assert jaeger_endpoint.split(":")[0] in services
    scraped = [t for job in config["receivers"]["prometheus"]["config"]["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]]
    for target in scraped:
        host, port = target.split(":")
        assert _args(services[host])["--metrics-port"] == port, target


@pytest.mark.parametrize("key", ["x-router", "x-worker", "x-otel-env"])
def test_extension_fields_are_used(key: str) -> None:
    assert key in load_compose()
    assert f"*{key.removeprefix('x-')}" in COMPOSE_FILE.read_text()
