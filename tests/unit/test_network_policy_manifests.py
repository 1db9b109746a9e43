"""deploy/components/network-policies read as files (tests/pods/test_network_policies_pods.py enforces them on
the real node): they select the pods the operator and its Deployment label, name ports that exist, and keep the
cloud metadata address out of every egress that allows any address."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_operator.names import APP_NAME, LABEL_NAME

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPONENT = DEPLOY / "components" / "network-policies"
METADATA = "169.254.169.254/32"


def _policies() -> dict[str, dict[str, Any]]:
    component = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    found: dict[str, dict[str, Any]] = {}
    for resource in component["resources"]:
        for document in yaml.safe_load_all((COMPONENT / resource).read_text()):
            assert document["kind"] == "NetworkPolicy"
            found[document["metadata"]["name"]] = document
    return found


def _operator_deployment() -> dict[str, Any]:
    text = (DEPLOY / "base" / "deployment.yaml").read_text()
    documents: list[dict[str, Any]] = [d for d in yaml.safe_load_all(text) if d]
    (deployment,) = documents
    return deployment


def test_operator_policies_select_the_operator_pods_and_name_its_ports() -> None:
    policies = _policies()
    template = _operator_deployment()["spec"]["template"]
    ports = {port["name"] for port in template["spec"]["containers"][0]["ports"]}
    for name in ("modelapp-operator-egress", "modelapp-operator-ingress"):
        policy = policies[name]
        assert policy["metadata"]["namespace"] == "modelapp-system"
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ingress = policies["modelapp-operator-ingress"]["spec"]["ingress"]
    allowed = {port["port"]: rule["from"] for rule in ingress for port in rule["ports"]}
    assert set(allowed) == {"webhooks", "metrics"} <= ports
    assert {"namespaceSelector": {"matchLabels": {"modelapp.dev/network-access": "ingress"}}} in allowed["webhooks"]
    assert allowed["metrics"] == [{"namespaceSelector": {"matchLabels": {"modelapp.dev/network-access": "monitoring"}}}]


def test_every_egress_to_any_address_excepts_the_metadata_endpoint() -> None:
    blocks = [
        peer["ipBlock"]
        for policy in _policies().values()
        for rule in policy["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    ]
    assert blocks, "no egress rule with an ipBlock"
    for block in blocks:
        assert block["cidr"] == "0.0.0.0/0" and METADATA in block["except"], block
    egress = _policies()["modelapp-operator-egress"]["spec"]["egress"]
    https = next(rule for rule in egress if any("ipBlock" in peer for peer in rule["to"]))
    assert {port["port"] for port in https["ports"]} == {443, 6443}


def test_app_policies_select_every_modelapp_pod_in_the_tenant_namespace() -> None:
    tenant = yaml.safe_load((DEPLOY / "tenant" / "kustomization.yaml").read_text())["namespace"]
    for name in ("modelapp-apps-ingress", "modelapp-apps-egress"):
        policy = _policies()[name]
        assert policy["metadata"]["namespace"] == tenant
        assert policy["spec"]["podSelector"] == {"matchLabels": {LABEL_NAME: APP_NAME}}
    (rule,) = _policies()["modelapp-apps-ingress"]["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": "http"}]
