"""deploy/ on the real control plane: `kubectl apply -k deploy/` succeeds, the operator's pod is
admitted under Pod Security `restricted`, its ServiceAccount is denied what it must not do, and the
operator running with exactly that ServiceAccount's token reconciles a ModelApp to Ready."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.storage.blob import BlobServiceClient
from modelapp_localstack import Azurite, KubeCluster, Registry
from modelapp_localstack.operator import allowed_sources
from modelapp_localstack.procs import free_port

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
OPERATOR_NS, APP_NS = "modelapp-system", "ml"
SERVICE_ACCOUNT = f"system:serviceaccount:{OPERATOR_NS}:modelapp-operator"


@pytest.fixture(scope="module")
def deployed(kube: KubeCluster) -> Iterator[None]:
    # The CRDs first (docs/operations.md, "Install").
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(DEPLOY.parent / "crds"))
    kube.kubectl("wait", "--for=condition=Established", "crd/modelapps.modelapp.io", "--timeout=60s")
    kube.kubectl("apply", "-k", str(DEPLOY))
    # The receiver's token: a Secret the installer creates (docs/operations.md, "Webhooks").
    token = {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": "modelapp-receiver-token", "namespace": OPERATOR_NS},
             "stringData": {"token": secrets.token_urlsafe(24)}}  # fmt: skip
    kube.kubectl("apply", "-f", "-", input=json.dumps(token))
    yield
    # Everything but the CRD, which other test modules share.
    rendered = [d for d in yaml.safe_load_all(kube.kubectl("kustomize", str(DEPLOY)).stdout) if d]
    rest = [d for d in rendered if d["kind"] != "CustomResourceDefinition"]
    kube.kubectl(
        "delete", "--ignore-not-found", "--wait=false", "-f", "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rest}),
    )  # fmt: skip


def test_operator_pod_is_admitted_under_restricted_and_becomes_available(kube: KubeCluster, deployed: None) -> None:
    for namespace in (OPERATOR_NS, APP_NS):
        labels = json.loads(kube.kubectl("get", "namespace", namespace, "-o", "json").stdout)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # kwok runs the pod; Pod Security admission would have refused to create it.
    kube.kubectl("rollout", "status", "deployment/modelapp-operator", "-n", OPERATOR_NS, "--timeout=90s", timeout=120)
    pods = json.loads(
        kube.kubectl(
            "get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=modelapp-operator", "-o", "json"
        ).stdout
    )["items"]
    assert len(pods) == 2 and pods[0]["spec"]["serviceAccountName"] == "modelapp-operator"  # one acts
    env_from = pods[0]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    settings = json.loads(kube.kubectl("get", "configmap", env_from, "-n", OPERATOR_NS, "-o", "json").stdout)["data"]
    assert settings["MODELAPP_NAMESPACES"] == APP_NS


def test_receiver_and_metrics_are_exposed(kube: KubeCluster, deployed: None) -> None:
    services = {
        s["metadata"]["name"]: s
        for s in json.loads(kube.kubectl("get", "services", "-n", OPERATOR_NS, "-o", "json").stdout)["items"]
    }
    webhooks, metrics = services["modelapp-operator-webhooks"], services["modelapp-operator-metrics"]
    assert [(p["port"], p["targetPort"]) for p in webhooks["spec"]["ports"]] == [(8082, "webhooks")]
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(8083, "metrics")]
    assert metrics["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert metrics["metadata"]["annotations"]["prometheus.io/port"] == "8083"
    for service in (webhooks, metrics):
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": "modelapp-operator"}
    found = kube.kubectl("get", "deployment", "modelapp-operator", "-n", OPERATOR_NS, "-o", "json")
    deployment = json.loads(found.stdout)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["receiver-token"]["secret"]["secretName"] == "modelapp-receiver-token"


def test_components_render_with_an_overlay_that_generates_the_token(kube: KubeCluster, tmp_path: Path) -> None:
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY, tmp_path)],
        "components": [os.path.relpath(DEPLOY / "components" / c, tmp_path)
                       for c in ("prometheus-operator", "alerts", "grafana-dashboard")],
        "secretGenerator": [{"name": "modelapp-receiver-token", "namespace": OPERATOR_NS, "literals": ["token=x"]}],
    }  # fmt: skip
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    rendered = kube.kubectl("kustomize", "--load-restrictor=LoadRestrictionsNone", str(tmp_path)).stdout
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in yaml.safe_load_all(rendered):
        by_kind.setdefault(item["kind"], []).append(item)
    assert {m["metadata"]["name"] for m in by_kind["PodMonitor"]} == {"modelapp-operator", "modelapp-apps"}
    assert len(by_kind["PrometheusRule"]) == 1
    secret_name = by_kind["Secret"][0]["metadata"]["name"]
    assert str(secret_name).startswith("modelapp-receiver-token-")  # generated: a hash suffix
    assert f"secretName: {secret_name}" in rendered  # the Deployment follows the generated name
    assert "grafana_dashboard" in rendered


def test_sample_and_aks_overlay_are_accepted_by_the_api_server(kube: KubeCluster, deployed: None) -> None:
    kube.kubectl("apply", "--dry-run=server", "-f", str(DEPLOY / "samples" / "modelapp.yaml"))
    kube.kubectl("apply", "--dry-run=server", "-k", str(DEPLOY / "overlays" / "aks"))


def can_i(kube: KubeCluster, *args: str) -> bool:
    result = kube.kubectl("auth", "can-i", *args, f"--as={SERVICE_ACCOUNT}", check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


ALLOWED = [
    ("create", "leases.coordination.k8s.io", "-n", OPERATOR_NS),  # two replicas, one active
    ("update", "leases.coordination.k8s.io/modelapp-operator-leader", "-n", OPERATOR_NS),
    ("get", "pods/any-operator-pod", "-n", OPERATOR_NS),  # the Lease holder's pod: where webhooks go
    ("get", "secrets", "-n", APP_NS),
    ("watch", "modelapps.modelapp.io", "-n", APP_NS),
    ("patch", "modelapps.modelapp.io", "--subresource=status", "-n", APP_NS),
    ("create", "deployments.apps", "-n", APP_NS),
    ("patch", "deployments.apps", "-n", APP_NS),
    ("watch", "deployments.apps", "-n", APP_NS),
    ("create", "services", "-n", APP_NS),
    ("list", "pods", "-n", APP_NS),  # a stalled rollout's pods: the app's refusal reason
    ("create", "events", "-n", APP_NS),
    ("create", "events.events.k8s.io", "-n", APP_NS),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ("watch", "namespaces"),
]
DENIED = [
    ("list", "secrets", "-n", APP_NS),  # by name only: it cannot enumerate them
    ("watch", "secrets", "-n", APP_NS),
    ("get", "secrets", "-n", "kube-system"),
    ("list", "secrets", "--all-namespaces"),
    ("get", "secrets", "-n", OPERATOR_NS),
    ("delete", "deployments.apps", "-n", APP_NS),  # children go away through owner references
    ("delete", "modelapps.modelapp.io", "-n", APP_NS),
    ("update", "modelapps.modelapp.io", "-n", APP_NS),
    ("patch", "modelapps.modelapp.io", "-n", APP_NS),  # it writes only their status
    ("create", "pods", "-n", APP_NS),
    ("watch", "pods", "-n", APP_NS),  # listed only while a rollout stalls, never watched
    ("get", "pods", "-n", "default"),
    ("create", "pods/exec", "-n", APP_NS),
    ("create", "deployments.apps", "-n", "default"),
    ("get", "modelapps.modelapp.io", "-n", "default"),
    ("patch", "nodes"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("bind", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "-n", APP_NS),
    ("update", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "serviceaccounts/token", "-n", APP_NS),
    ("impersonate", "serviceaccounts", "-n", APP_NS),
    ("update", "leases.coordination.k8s.io/kube-controller-manager", "-n", "kube-system"),
    ("update", "leases.coordination.k8s.io/another-lease", "-n", OPERATOR_NS),  # only its own Lease
    ("delete", "leases.coordination.k8s.io/modelapp-operator-leader", "-n", OPERATOR_NS),
    ("create", "leases.coordination.k8s.io", "-n", APP_NS),
    ("list", "pods", "-n", OPERATOR_NS),
]


@pytest.mark.parametrize("request_", ALLOWED, ids=" ".join)
def test_service_account_may_do_what_the_operator_does(
    kube: KubeCluster, deployed: None, request_: tuple[str, ...]
) -> None:
    assert can_i(kube, *request_)


@pytest.mark.parametrize("request_", DENIED, ids=" ".join)
def test_service_account_is_denied_everything_else(
    kube: KubeCluster, deployed: None, request_: tuple[str, ...]
) -> None:
    assert not can_i(kube, *request_)


def test_operator_with_only_its_service_account_reconciles_a_modelapp(
    kube: KubeCluster, registry: Registry, azurite: Azurite, deployed: None, tmp_path: Path
) -> None:
    # The operator as the Deployment runs it: the ServiceAccount's token and the ConfigMap's settings.
    token = kube.kubectl("create", "token", "modelapp-operator", "-n", OPERATOR_NS, "--duration=1h").stdout.strip()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": kube.server, "certificate-authority": str(kube.ca_file)}}
                ],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "operator"}}],
                "current-context": "c",
            }
        )
    )
    pod = json.loads(kube.kubectl("get", "deployment", "modelapp-operator", "-n", OPERATOR_NS, "-o", "json").stdout)
    config_map = pod["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    settings = json.loads(kube.kubectl("get", "configmap", config_map, "-n", OPERATOR_NS, "-o", "json").stdout)["data"]

    secrets = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "regcred", "namespace": APP_NS},
         "type": "kubernetes.io/dockerconfigjson", "stringData": {".dockerconfigjson": registry.dockerconfigjson()}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "storage", "namespace": APP_NS},
         "stringData": {"connectionString": azurite.connection_string}},
    ]  # fmt: skip
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": secrets}))
    digest = registry.push_random_image("deploy/iris", "stable")
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client("models")
    with contextlib.suppress(Exception):
        container.create_container()
    content = b"deploy test model"
    container.get_blob_client("deploy/model.onnx").upload_blob(
        content, overwrite=True, metadata={"sha256": hashlib.sha256(content).hexdigest(), "format": "onnx"}
    )
    sample = yaml.safe_load((DEPLOY / "samples" / "modelapp.yaml").read_text())
    sample["spec"]["image"] = {
        "repository": f"{registry.host}/deploy/iris",
        "tag": "stable",
        "pullSecretName": "regcred",
    }
    sample["spec"]["model"]["blob"] = {
        "accountUrl": azurite.blob_endpoint,
        "container": "models",
        "name": "deploy/model.onnx",
    }
    sample["spec"]["model"]["credentials"] = {"secretRef": {"name": "storage"}}
    kube.kubectl("apply", "-f", "-", input=json.dumps(sample))

    log_file = tmp_path / "operator.log"
    metrics_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MODELAPP_")},
        **settings,
        "MODELAPP_METRICS_PORT": str(metrics_port),  # not the ConfigMap's fixed port: tests run side by side
        "MODELAPP_METRICS_BIND": "127.0.0.1",
        "MODELAPP_LOG_FORMAT": "text",
        "KUBECONFIG": str(kubeconfig),
        "MODELAPP_REGISTRY_CA_FILE": str(registry.ca_file),
        **allowed_sources(registry),  # what the platform admin allows the stack's operator (issue 22)
    }
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelapp_operator", "--liveness", "off"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        wait = subprocess.run(
            [sys.executable, "-m", "modelapp_operator.cli", "wait", "iris", "-n", APP_NS, "--timeout", "120",
             "--no-progress", "--kubeconfig", str(kube.kubeconfig)],
            capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        # Read the child before the ModelApp (and, through the garbage collector, the child) goes away.
        found = kube.kubectl("get", "deployment", "iris", "-n", APP_NS, "-o", "json", check=False)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        kube.kubectl("delete", "modelapp", "iris", "-n", APP_NS, "--ignore-not-found", "--wait=false")
    log_text = log_file.read_text(errors="replace")
    assert wait.returncode == 0, f"{wait.stderr}\n--- operator ---\n{log_text[-4000:]}"
    assert "Forbidden" not in log_text and "forbidden" not in log_text, log_text[-4000:]
    assert "Traceback" not in log_text, log_text[-4000:]
    assert found.returncode == 0, found.stderr
    assert 'modelapp_operator_modelapps{condition="Ready",status="True"} 1.0' in metrics
    assert "modelapp_operator_active 1.0" in metrics
    deployment = json.loads(found.stdout)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"{registry.host}/deploy/iris@{digest}"


def test_ci_role_lets_a_pipeline_patch_modelapps_and_nothing_else(kube: KubeCluster, deployed: None) -> None:
    kube.kubectl("create", "serviceaccount", "pipeline", "-n", APP_NS)
    account = f"--serviceaccount={APP_NS}:pipeline"
    kube.kubectl("create", "rolebinding", "pipeline", "--clusterrole=modelapp-ci", account, "-n", APP_NS)
    pipeline = f"--as=system:serviceaccount:{APP_NS}:pipeline"

    def allowed(*args: str) -> bool:
        return kube.kubectl("auth", "can-i", *args, pipeline, check=False).stdout.strip() == "yes"

    assert allowed("patch", "modelapps.modelapp.io", "-n", APP_NS)
    assert allowed("get", "modelapps.modelapp.io", "-n", APP_NS)
    for denied in (
        ("patch", "modelapps.modelapp.io", "--subresource=status", "-n", APP_NS),
        ("delete", "modelapps.modelapp.io", "-n", APP_NS),
        ("patch", "deployments.apps", "-n", APP_NS),
        ("get", "secrets", "-n", APP_NS),
        ("patch", "modelapps.modelapp.io", "-n", "default"),
    ):
        assert not allowed(*denied), denied
