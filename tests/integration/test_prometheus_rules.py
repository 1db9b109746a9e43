"""The alerts in deploy/components/alerts pass `promtool check rules` and load into a real Prometheus (the
local stack's, on the stack's host address only), which evaluates them against the operator's metrics."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_localstack import Stack
from modelapp_localstack.prometheus import Prometheus

pytestmark = pytest.mark.integration

RULE = Path(__file__).resolve().parents[2] / "deploy" / "components" / "alerts" / "prometheusrule.yaml"
ALERTS = {"ModelAppRolledBack", "ModelAppDegraded", "ModelAppPollingFailing", "ModelAppChangeToReadySlow"}


def groups() -> list[dict[str, Any]]:
    rule = yaml.safe_load(RULE.read_text())
    assert rule["kind"] == "PrometheusRule"
    return list(rule["spec"]["groups"])


def test_promtool_checks_the_alert_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: Debian package `prometheus` (deploy/local/setup.sh)"
    rules = tmp_path / "modelapp.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups()}))
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout, result.stdout
    names = {rule["alert"] for group in groups() for rule in group["rules"]}
    assert names == ALERTS


def test_prometheus_listens_on_the_stack_host_and_loads_the_alerts(local_stack: Stack, prometheus: Prometheus) -> None:
    assert urllib.parse.urlsplit(prometheus.url).hostname == local_stack.host
    assert prometheus.folder.is_relative_to(local_stack.run_dir)
    prometheus.load_rules("modelapp", groups())
    deadline = time.monotonic() + 20
    loaded: set[str] = set()
    while time.monotonic() < deadline and loaded != ALERTS:
        found = prometheus.api("rules", type="alert")["groups"]
        loaded = {rule["name"] for group in found for rule in group["rules"] if rule["health"] != "err"}
        time.sleep(0.5)
    assert loaded == ALERTS
