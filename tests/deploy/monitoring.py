"""Readers for deploy/grafana and deploy/prometheus: dashboards, their queries, alert rules, scrapes.

Shared by the structural tests (test_grafana.py, test_prometheus_rules.py) and the live ones
(test_dashboards_live.py), so that every check walks the same list of queries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.deploy_manifests import DEPLOY

GRAFANA = DEPLOY / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
PROVISIONING = GRAFANA / "provisioning"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS_FILE = PROMETHEUS / "alerts.yaml"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yaml"

# What Grafana puts in for its own variables when the live tests run a panel's query.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "15s", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>[A-Za-z_]\w*)\s*\)\s*$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard or rule file, with where it comes from."""

    where: str  # "llmserve-fleet.json: panel 'Requests/s by model' A" or "alert LLMServeTTFTHigh"
    expr: str
    instant: bool = False  # Grafana asks for the last value only (stat panels)


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a JSON object"
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included, rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def panel_queries(path: Path) -> list[Query]:
    """The PromQL of every target of every panel of a dashboard file."""
    out = []
    for panel in panels(load_dashboard(path)):
        for target in panel.get("targets", []):
            where = f"{path.name}: panel {panel.get('title')!r} {target.get('refId')}"
            out.append(Query(where, target["expr"], bool(target.get("instant"))))
    return out


def variable_queries(path: Path) -> list[tuple[str, str | None, str]]:
    """(variable name, series selector or None, label) of each ``label_values`` query variable."""
    out = []
    for var in load_dashboard(path).get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(query)
        assert m is not None, f"{path.name}: variable {var['name']}: unsupported query {query!r}"
        out.append((var["name"], m.group("selector"), m.group("label")))
    return out


def all_panel_queries() -> list[Query]:
    return [q for path in dashboard_files() for q in panel_queries(path)]


def alert_rules() -> list[dict[str, Any]]:
    """The rules of deploy/prometheus/alerts.yaml, every group."""
    data = yaml.safe_load(ALERTS_FILE.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def alert_queries() -> list[Query]:
    return [Query(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for r in alert_rules()]


def substitute_variables(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation, for the variables a test gives plus Grafana's built-ins."""
    known = {**GRAFANA_BUILTINS, **values}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in known, f"no value for ${name} in {expr!r}"
        return known[name]

    return _VARIABLE.sub(sub, expr)


@dataclass(frozen=True)
class Exposition:
    """One /metrics scrape: sample names with their label sets, and each sample name's family type."""

    samples: dict[str, list[dict[str, str]]]
    types: dict[str, str]  # sample name -> counter / gauge / histogram / ...

    @classmethod
    def parse(cls, *texts: str) -> Exposition:
        samples: dict[str, list[dict[str, str]]] = {}
        types: dict[str, str] = {}
        for text in texts:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples.setdefault(sample.name, []).append(dict(sample.labels))
                    types[sample.name] = family.type
        return cls(samples, types)

    def label_names(self, name: str) -> set[str]:
        return {label for labels in self.samples.get(name, []) for label in labels}
