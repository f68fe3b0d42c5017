"""deploy/grafana: dashboards are well-formed Grafana JSON, and Compose provisions them (and the
Prometheus they read) with no clicks. What the queries return is tested live in
test_dashboards_live.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_manifests import COMPOSE_FILE, compose_config, compose_services
from tests.deploy.monitoring import (
    DASHBOARDS,
    GRAFANA_BUILTINS,
    PROMETHEUS_CONFIG,
    PROVISIONING,
    dashboard_files,
    load_dashboard,
    panel_queries,
    panels,
    variable_queries,
)
from tests.deploy.promql import selectors

PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text", "piechart"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (resolved) of a Compose service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        src, dst = volume.split(":")[:2]
        out[dst] = str((COMPOSE_FILE.parent / src).resolve())
    return out


@pytest.fixture(params=dashboard_files(), ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> tuple[Path, dict[str, Any]]:
    return request.param, load_dashboard(request.param)


def test_there_is_a_fleet_overview() -> None:
    titles = {load_dashboard(p)["uid"]: load_dashboard(p)["title"] for p in dashboard_files()}
    assert "llmserve-fleet" in titles, titles


def test_dashboard_top_level(dashboard: tuple[Path, dict[str, Any]]) -> None:
    path, d = dashboard
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]), d.get("uid")
    assert d["title"] and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None, "provisioned dashboards must not carry a database id"
    assert isinstance(d["panels"], list) and panels(d)
    uids = [load_dashboard(p)["uid"] for p in dashboard_files()]
    assert uids.count(d["uid"]) == 1, f"{path.name}: uid {d['uid']} used twice"


def test_panels_have_datasource_targets_and_a_place(dashboard: tuple[Path, dict[str, Any]]) -> None:
    path, d = dashboard
    ids = [p["id"] for p in d["panels"]] + [p["id"] for r in d["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in d["panels"]:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0 and pos["w"] > 0, panel["title"]
        mine = {(pos["x"] + i, pos["y"] + j) for i in range(pos["w"]) for j in range(pos["h"])}
        assert not mine & cells, f"{path.name}: panel {panel['title']!r} overlaps another"
        cells |= mine
    for panel in panels(d):
        title = panel.get("title")
        assert title and panel["type"] in PANEL_TYPES, f"{path.name}: {title!r} ({panel.get('type')})"
        assert panel["datasource"] == DATASOURCE_REF, f"{path.name}: {title!r}"
        targets = panel["targets"]
        assert targets, f"{path.name}: {title!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), f"{path.name}: {title!r} refIds"
        for target in targets:
            assert target["datasource"] == DATASOURCE_REF, f"{path.name}: {title!r}"
            assert target["expr"].strip(), f"{path.name}: {title!r}"


def test_variables_and_queries_resolve(dashboard: tuple[Path, dict[str, Any]]) -> None:
    """Every ``$var`` a query uses is a dashboard variable or Grafana's own; the data source is a
    variable (so an imported dashboard works with any Prometheus); every query selects llmserve
    metrics only."""
    path, d = dashboard
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, selector, label in variable_queries(path):
        assert variables[name]["datasource"] == DATASOURCE_REF
        assert selector is not None and all(s.metric.startswith("llmserve:") for s in selectors(selector))
        assert label
    known = set(variables) | set(GRAFANA_BUILTINS)
    for query in panel_queries(path):
        used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", query.expr))
        assert used <= known, f"{query.where}: unknown variables {used - known}"
        found = selectors(query.expr)
        assert found, f"{query.where}: selects nothing"
        assert all(s.metric.startswith("llmserve:") for s in found), query.where


def test_compose_runs_prometheus_and_grafana_in_every_profile() -> None:
    for profile in ("cpu", "gpu"):
        result = compose_config("--profile", profile)
        assert result.returncode == 0, result.stderr
        services = json.loads(result.stdout)["services"]
        assert {"prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        assert "profiles" not in compose_services()[name], f"{name} must run in every profile"


def test_prometheus_scrapes_every_router_and_worker_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name, service in compose_services().items():
        ports = [str(a).split("=", 1)[1] for a in service.get("command", [])
                 if str(a).startswith("--metrics-port=")]
        expected |= {f"{name}:{p}" for p in ports}
    assert expected and targets == expected


def test_grafana_provisions_the_prometheus_datasource() -> None:
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    (datasource,) = provisioned["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", datasource["url"]).groups()  # type: ignore[union-attr]
    assert host in compose_services(), f"{host} is not a Compose service"
    assert port == "9090", "Prometheus listens on 9090 in its image"
    scrape_s = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape_s


def test_grafana_provisions_the_dashboards_folder_and_home_with_anonymous_viewers() -> None:
    grafana = compose_services()["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == str(PROVISIONING)
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "llmserve.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == str(DASHBOARDS)
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, file_name = home.rpartition("/")
    assert (Path(mounts[folder]) / file_name).is_file(), f"home dashboard {home} is not mounted"
    for api_version in (yaml.safe_load(p.read_text())["apiVersion"] for p in PROVISIONING.rglob("*.yaml")):
        assert api_version == 1
