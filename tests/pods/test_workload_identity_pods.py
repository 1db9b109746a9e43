"""Workload identity on real pods (issue 21): the app's pods on the real node get their token from the kubelet
(a projected service-account token volume, audience api://AzureADTokenExchange), trade it at the stack's
Entra ID stand-in and download the model from Azurite in OAuth mode with the bearer token only.

AKS's workload identity webhook is stood in for by a MutatingAdmissionPolicy of the real API server
(modelapp_localstack.entra.workload_identity_policy): for pods the operator labels
`azure.workload.identity/use: "true"` it injects the projected token volume, AZURE_TENANT_ID,
AZURE_AUTHORITY_HOST and AZURE_FEDERATED_TOKEN_FILE, as the webhook does (AZURE_CLIENT_ID comes from the
ModelApp's credentials.clientId), plus the stack's CA. The first test runs the operator out of cluster with
its own service account's token file, as in tests/cluster/test_workload_identity.py; the second runs it in
cluster, where the kubelet projects its token too."""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.entra import (
    LOCAL_CA_CONFIG_MAP,
    POLICY_NAME,
    TOKEN_FILE,
    EntraStandIn,
    workload_identity_policy,
)
from modelapp_localstack.node import real_node_namespace_annotations
from modelapp_localstack.operator import OperatorProcess, allowed_sources, apply_crd
from modelapp_serving.publish import PublishedModel

from tests.cluster.helpers import App, apply, get, operator_running, wait_ready
from tests.cluster.test_workload_identity import (
    KEY_VARIABLES,
    REPO_ROOT,
    SETOSA,
    Identity,
    issuer_of,
    make_identity,
    publish_sample,
    service_account_token,
    tls_env,
)
from tests.pods.conftest import Image

pytestmark = pytest.mark.pods

NAMESPACE = f"wip-{uuid.uuid4().hex[:6]}"
OPT_IN_LABEL = "modelapp.dev/local-workload-identity"


@pytest.fixture(scope="module")
def entra(local_stack: Stack, kube: KubeCluster) -> Iterator[EntraStandIn]:
    entra = local_stack.start_entra()
    items = workload_identity_policy(entra, OPT_IN_LABEL)
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    yield entra
    for kind in ("mutatingadmissionpolicybinding", "mutatingadmissionpolicy"):
        kube.kubectl("delete", kind, POLICY_NAME, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def namespace(kube: KubeCluster, registry: Registry, entra: EntraStandIn) -> Iterator[str]:
    body = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": NAMESPACE,
            "labels": {OPT_IN_LABEL: "true"},
            "annotations": real_node_namespace_annotations(),
        },
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    kube.kubectl("create", "configmap", LOCAL_CA_CONFIG_MAP, "-n", NAMESPACE, f"--from-file=ca.crt={entra.ca_file}")
    pull = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "regcred", "namespace": NAMESPACE},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": registry.dockerconfigjson()},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(pull))
    yield NAMESPACE
    kube.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(
    kube: KubeCluster,
    registry: Registry,
    entra: EntraStandIn,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OperatorProcess, Identity]]:
    folder = tmp_path_factory.mktemp("operator-identity")
    identity = make_identity(kube, entra, folder, "modelapp-operator", namespace=namespace)
    env = {
        **entra.workload_identity_env(identity.client_id, identity.token_file),
        **tls_env(entra),
        "MODELAPP_POLL_INTERVAL_SECONDS": "2",
        "MODELAPP_RECEIVER_ENABLED": "false",
    }
    assert not set(KEY_VARIABLES) & set(os.environ), "a storage key in the test's environment"
    with operator_running(kube, registry, folder / "operator.log", namespace, env) as running:
        yield running, identity


def test_app_pods_download_the_model_with_their_projected_token_only(
    kube: KubeCluster,
    local_stack: Stack,
    entra: EntraStandIn,
    namespace: str,
    operator: tuple[OperatorProcess, Identity],
    app_image: Image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    oauth_azurite: Azurite = local_stack.start_azurite_oauth()
    running, operator_identity = operator
    app, published, app_identity = _publish_and_apply(
        kube, entra, oauth_azurite, app_image, namespace, tmp_path, monkeypatch
    )
    status = wait_ready(kube, app, running, timeout=300)["status"]["model"]
    assert status["version"] == published.etag and status["snapshot"], status

    # The pod as admitted: the injected volume and env, no key.
    pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l", "azure.workload.identity/use=true",
                                   "-o", "json").stdout)["items"]  # fmt: skip
    ready = [pod for pod in pods if pod["status"].get("podIP") and pod["metadata"].get("deletionTimestamp") is None]
    assert ready, pods
    pod = ready[0]
    container = pod["spec"]["containers"][0]
    env = {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}
    assert env["AZURE_FEDERATED_TOKEN_FILE"] == TOKEN_FILE and env["AZURE_CLIENT_ID"] == app_identity.client_id
    assert env["AZURE_AUTHORITY_HOST"] == entra.authority_host and env["AZURE_TENANT_ID"] == entra.tenant_id
    assert not set(KEY_VARIABLES) & set(env)
    assert pod["spec"]["serviceAccountName"] == app_identity.service_account

    # The pod answers with the model it downloaded (from the host, on the pod's own address).
    port = container["ports"][0]["containerPort"]
    request = urllib.request.Request(
        f"http://{pod['status']['podIP']}:{port}/predict",
        data=json.dumps({"instances": [SETOSA]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read()) == {"predictions": [0]}

    # The pod's token came from the kubelet's projected volume: the stand-in issued a token for the app's
    # subject, which nothing on the host asked for (the host's token file for it is never read).
    deadline = time.monotonic() + 5
    while (app_identity.client_id, app_identity.subject) not in {
        (token.client_id, token.subject) for token in entra.authority.issued
    }:
        assert time.monotonic() < deadline, entra.authority.refused
        time.sleep(0.2)
    assert (operator_identity.client_id, operator_identity.subject) in {
        (token.client_id, token.subject) for token in entra.authority.issued
    }
    assert get(kube, "deployment", app) is not None


IN_CLUSTER_NAMESPACE = f"{NAMESPACE}-ic"


def _in_cluster_objects(
    entra: EntraStandIn, registry: Registry, operator_image: Image, client_id: str, api_ip: str
) -> list[dict[str, Any]]:
    """The operator in the app's namespace, as deploy/ runs it (its image, the tenant Role of deploy/tenant,
    restricted security context) with the workload identity label its AKS overlay sets, and a ClusterRole
    binding to read the CRD; no Secret but the image pull's."""
    ns = IN_CLUSTER_NAMESPACE
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {OPT_IN_LABEL: "true"},
                         "annotations": real_node_namespace_annotations()},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": LOCAL_CA_CONFIG_MAP, "namespace": ns},
         "data": {"ca.crt": entra.ca_file.read_text()}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
         "metadata": {"name": "regcred", "namespace": ns},
         "stringData": {".dockerconfigjson": registry.dockerconfigjson()}},
    ]  # fmt: skip
    for document in yaml.safe_load_all((REPO_ROOT / "deploy" / "tenant" / "role.yaml").read_text()):
        document["metadata"]["namespace"] = ns
        for subject in document.get("subjects", []):
            subject["namespace"] = ns
        objects.append(document)
    objects += [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": ns},
         "rules": [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                    "verbs": ["get", "list", "watch"]},
                   {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ns},
         "subjects": [{"kind": "ServiceAccount", "name": "modelapp-operator", "namespace": ns}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "modelapp-operator", "namespace": ns},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "modelapp-operator"}}, "template": {
             "metadata": {"labels": {"app": "modelapp-operator", "azure.workload.identity/use": "true"}},
             "spec": {
                 "serviceAccountName": "modelapp-operator",
                 "imagePullSecrets": [{"name": "regcred"}],
                 "hostAliases": [{"ip": api_ip, "hostnames": ["kubernetes.default.svc",
                                                              "kubernetes.default.svc.cluster.local"]}],
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                     "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{
                     "name": "operator", "image": operator_image.by_digest,
                     "env": [{"name": "AZURE_CLIENT_ID", "value": client_id},
                             {"name": "MODELAPP_NAMESPACES", "value": ns},
                             {"name": "MODELAPP_POLL_INTERVAL_SECONDS", "value": "2"},
                             {"name": "MODELAPP_RECEIVER_ENABLED", "value": "false"},
                             {"name": "MODELAPP_METRICS_PORT", "value": "off"},
                             # The stack's registry and storage only, as a platform admin would allow them.
                             *({"name": key, "value": value} for key, value in allowed_sources(registry).items()),
                             *({"name": f"MODELAPP_POD_{key.upper()}", "valueFrom": {"fieldRef": {"fieldPath": path}}}
                               for key, path in (("name", "metadata.name"), ("uid", "metadata.uid"),
                                                 ("ip", "status.podIP")))],
                     "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                         "capabilities": {"drop": ["ALL"]}},
                     "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                 }],
                 "volumes": [{"name": "tmp", "emptyDir": {}}],
             }}}},
    ]  # fmt: skip
    return objects


def test_the_operator_in_cluster_resolves_with_its_projected_token_only(
    kube: KubeCluster,
    local_stack: Stack,
    registry: Registry,
    entra: EntraStandIn,
    operator_image: Image,
    app_image: Image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    oauth_azurite = local_stack.start_azurite_oauth()
    ns = IN_CLUSTER_NAMESPACE
    operator_client_id = str(uuid.uuid4())
    api_ip = kube.kubectl("get", "service", "kubernetes", "-n", "default", "-o", "jsonpath={.spec.clusterIP}").stdout
    objects = _in_cluster_objects(entra, registry, operator_image, operator_client_id, api_ip)
    apply_crd(kube)
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects[:1]}))
    kube.kubectl("create", "serviceaccount", "modelapp-operator", "-n", ns)
    try:
        kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects[1:]}))
        issuer = issuer_of(service_account_token(kube, "modelapp-operator", namespace=ns))
        operator_subject = f"system:serviceaccount:{ns}:modelapp-operator"
        entra.authority.add_federated_credential(operator_client_id, issuer, operator_subject)
        app, published, app_identity = _publish_and_apply(
            kube, entra, oauth_azurite, app_image, ns, tmp_path, monkeypatch
        )
        rolled = kube.kubectl("rollout", "status", "deployment/modelapp-operator", "-n", ns, "--timeout=180s",
                              check=False, timeout=200)  # fmt: skip
        logs = kube.kubectl("logs", "-n", ns, "deployment/modelapp-operator", "--tail=80", check=False).stdout
        assert rolled.returncode == 0, rolled.stderr + logs
        status = _wait_ready_in_cluster(kube, app, ns)
        assert status["version"] == published.etag and status["snapshot"], status
        issued = {(token.client_id, token.subject) for token in entra.authority.issued}
        assert (operator_client_id, operator_subject) in issued
        assert (app_identity.client_id, app_identity.subject) in issued
        operator_pod = json.loads(kube.kubectl("get", "pods", "-n", ns, "-l", "app=modelapp-operator",
                                               "-o", "json").stdout)["items"][0]  # fmt: skip
        env = {e["name"]: e.get("value") for e in operator_pod["spec"]["containers"][0]["env"]}
        assert env["AZURE_FEDERATED_TOKEN_FILE"] == TOKEN_FILE and not set(KEY_VARIABLES) & set(env)
    finally:
        logs = kube.kubectl("logs", "-n", ns, "deployment/modelapp-operator", "--tail=400", check=False).stdout
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        kube.kubectl("delete", "clusterrolebinding,clusterrole", ns, "--ignore-not-found", check=False)
    assert "Traceback" not in logs, logs


def _publish_and_apply(
    kube: KubeCluster,
    entra: EntraStandIn,
    azurite: Azurite,
    image: Image,
    namespace: str,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[App, PublishedModel, Identity]:
    """The sample model published by the publisher's identity, and a ModelApp whose pods use the app's."""
    publisher = make_identity(kube, entra, folder, "publisher", namespace=namespace)
    app_identity = make_identity(kube, entra, folder, "iris", namespace=namespace)
    blob_name = f"{namespace}/iris.onnx"
    published = publish_sample(entra, publisher, f"{azurite.blob_endpoint}/models/{blob_name}", folder, monkeypatch)
    app = App(namespace, "iris", image.repository, image.digest, blob_name, published.sha256, published.etag)
    apply(kube, _modelapp(app, image, azurite, app_identity))
    return app, published, app_identity


def _modelapp(app: App, image: Image, azurite: Azurite, identity: Identity) -> dict[str, Any]:
    return {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": app.name, "namespace": app.namespace},
        "spec": {
            "image": {"repository": image.repository, "digest": image.digest, "pullSecretName": "regcred"},
            "model": {
                "blob": {"accountUrl": azurite.blob_endpoint, "container": "models", "name": app.blob_name},
                "credentials": {"serviceAccountName": identity.service_account, "clientId": identity.client_id},
            },
            "replicas": 1,
        },
    }


def _wait_ready_in_cluster(kube: KubeCluster, app: App, ns: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = get(kube, "modelapp", app) or {}
        ready = [c for c in body.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
        if ready and ready[0]["status"] == "True":
            return dict(body["status"]["model"])
        time.sleep(1)
    logs = kube.kubectl("logs", "-n", ns, "deployment/modelapp-operator", "--tail=80", check=False).stdout
    raise AssertionError(f"ModelApp {ns}/{app.name} not Ready: {body.get('status')}\n{logs}")
