"""Workload identity on real pods (issue 21): the app's pods on the real node get their token from the kubelet
(a projected service-account token volume, audience api://AzureADTokenExchange), trade it at the stack's
Entra ID stand-in and download the model from Azurite in OAuth mode with the bearer token only.

AKS's workload identity webhook is stood in for by a MutatingAdmissionPolicy of the real API server
(modelapp_localstack.entra.workload_identity_policy): for pods the operator labels
`azure.workload.identity/use: "true"` it injects the projected token volume, AZURE_TENANT_ID,
AZURE_AUTHORITY_HOST and AZURE_FEDERATED_TOKEN_FILE, as the webhook does (AZURE_CLIENT_ID comes from the
ModelApp's credentials.clientId), plus the stack's CA. The operator runs out of cluster with its own
service account's token file, as in tests/cluster/test_workload_identity.py."""

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
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.entra import (
    LOCAL_CA_CONFIG_MAP,
    POLICY_NAME,
    TOKEN_FILE,
    EntraStandIn,
    workload_identity_policy,
)
from modelapp_localstack.node import real_node_namespace_annotations
from modelapp_localstack.operator import OperatorProcess

from tests.cluster.helpers import App, apply, get, operator_running, wait_ready
from tests.cluster.test_workload_identity import (
    KEY_VARIABLES,
    SETOSA,
    Identity,
    make_identity,
    publish_sample,
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
    publisher = make_identity(kube, entra, tmp_path, "publisher", namespace=namespace)
    app_identity = make_identity(kube, entra, tmp_path, "iris", namespace=namespace)
    blob_name = f"{namespace}/iris.onnx"
    published = publish_sample(
        entra, publisher, f"{oauth_azurite.blob_endpoint}/models/{blob_name}", tmp_path, monkeypatch
    )
    app = App(namespace, "iris", app_image.repository, app_image.digest, blob_name, published.sha256, published.etag)
    body: dict[str, Any] = {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": app.name, "namespace": namespace},
        "spec": {
            "image": {"repository": app_image.repository, "digest": app_image.digest, "pullSecretName": "regcred"},
            "model": {
                "blob": {"accountUrl": oauth_azurite.blob_endpoint, "container": "models", "name": blob_name},
                "credentials": {"serviceAccountName": app_identity.service_account, "clientId": app_identity.client_id},
            },
            "replicas": 1,
        },
    }
    apply(kube, body)
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
