"""deploy/prometheus: Prometheus's own tools accept the config and the alert rules, and every alert
fires on series that show its problem (promtool's rule unit tests in alerts_test.yaml)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.deploy.deploy_manifests import compose_services
from tests.deploy.monitoring import ALERTS_FILE, PROMETHEUS_CONFIG, alert_rules
from tests.deploy.prometheus_server import promtool

ALERT_TESTS = Path(__file__).with_name("alerts_test.yaml")
REQUIRED_ALERTS = {
    "LLMServeNoLiveWorker",        # no live worker for a model
    "LLMServeTTFTHigh",            # p99 TTFT over a threshold
    "LLMServeKVCacheSaturated",    # KV usage saturated
    "LLMServeErrorRatioHigh",      # error ratio
    "LLMServeWorkerFlapping",      # worker flapping
}


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_alert_fires_in_promtools_rule_unit_tests() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {r["alert"] for r in alert_rules()}, "an alert without a test that makes it fire"


def test_the_required_alerts_exist_with_severity_and_text() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert REQUIRED_ALERTS <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path) -> None:
    """The config as the Compose service mounts it: rule files at their container paths."""
    service = compose_services()["prometheus"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in service["volumes"])  # host path -> container path
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    in_container = {dst: (PROMETHEUS_CONFIG.parent.parent / src).resolve() for src, dst in mounts.items()}
    assert f"--config.file={next(d for s, d in mounts.items() if s.endswith('prometheus.yaml'))}" in \
        service["command"]
    local = []
    for path in config["rule_files"]:
        assert path in in_container, f"rule file {path} is not mounted into the container"
        local.append(str(in_container[path]))
    config["rule_files"] = local
    copy = tmp_path / "prometheus.yaml"
    copy.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
