"""The API server itself rejects invalid ModelApps (schema + CEL), naming the field; no operator runs here."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from modelapp_localstack import KubeCluster

pytestmark = pytest.mark.cluster

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "modelapp.yaml"
DIGEST = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def namespace(kube: KubeCluster) -> str:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", "crd/modelapps.modelapp.io", "--timeout=60s")
    name = f"crd-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", name)
    return name


def valid(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": "iris", "namespace": namespace},
        "spec": {
            "image": {"repository": "127.0.0.1:5000/team/iris", "tag": "1.0", "pullSecretName": "regcred"},
            "model": {
                "blob": {
                    "accountUrl": "http://127.0.0.1:10000/devstoreaccount1",
                    "container": "models",
                    "name": "iris/model.onnx",
                },
                "credentials": {"secretRef": {"name": "storage"}},
            },
        },
    }


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        body = body.setdefault(key, {})
    if value is _DELETE:
        body.pop(keys[-1], None)
    else:
        body[keys[-1]] = value


_DELETE = object()

# (id, changes as (path, value) pairs, text the API server's message must contain)
INVALID: list[tuple[str, list[tuple[str, Any]], str]] = [
    ("repository-without-host", [("spec.image.repository", "iris")], "spec.image.repository"),
    ("repository-uppercase", [("spec.image.repository", "127.0.0.1:5000/Team/Iris")], "spec.image.repository"),
    ("tag-with-space", [("spec.image.tag", "1 0")], "spec.image.tag"),
    ("tag-and-digest", [("spec.image.digest", DIGEST)], "spec.image.tag"),
    ("neither-tag-nor-digest", [("spec.image.tag", _DELETE)], "spec.image.tag"),
    ("digest-malformed", [("spec.image.tag", _DELETE), ("spec.image.digest", "sha256:xyz")], "spec.image.digest"),
    (
        "follow-tag-with-digest",
        [("spec.image.tag", _DELETE), ("spec.image.digest", DIGEST), ("spec.image.followTag", True)],
        "spec.image.followTag",
    ),
    ("pull-secret-name", [("spec.image.pullSecretName", "Reg_Cred")], "spec.image.pullSecretName"),
    (
        "account-url-sas",
        [("spec.model.blob.accountUrl", "https://a.blob.core.windows.net/?sig=x")],
        "spec.model.blob.accountUrl",
    ),
    (
        "account-url-scheme",
        [("spec.model.blob.accountUrl", "ftp://a.blob.core.windows.net")],
        "spec.model.blob.accountUrl",
    ),
    ("container-uppercase", [("spec.model.blob.container", "Models")], "spec.model.blob.container"),
    ("blob-name-trailing-slash", [("spec.model.blob.name", "iris/")], "spec.model.blob.name"),
    ("missing-blob-name", [("spec.model.blob.name", _DELETE)], "spec.model.blob.name"),
    ("sha256-short", [("spec.model.sha256", "abc")], "spec.model.sha256"),
    ("format-unknown", [("spec.model.format", "tensorflow")], "spec.model.format"),
    ("pickle-without-consent", [("spec.model.format", "pickle")], "spec.model.allowPickle"),
    ("no-credentials", [("spec.model.credentials", {})], "spec.model.credentials"),
    (
        "both-credentials",
        [("spec.model.credentials", {"serviceAccountName": "sa", "secretRef": {"name": "s"}})],
        "spec.model.credentials",
    ),
    (
        "client-id-with-secret",
        [("spec.model.credentials", {"secretRef": {"name": "s"}, "clientId": "00000000-0000-0000-0000-000000000001"})],
        "spec.model.credentials.clientId",
    ),
    (
        "client-id-not-uuid",
        [("spec.model.credentials", {"serviceAccountName": "sa", "clientId": "me"})],
        "spec.model.credentials.clientId",
    ),
    ("replicas-negative", [("spec.replicas", -1)], "spec.replicas"),
    ("replicas-too-many", [("spec.replicas", 1000)], "spec.replicas"),
    ("port-privileged", [("spec.port", 80)], "spec.port"),
    ("env-reserved-name", [("spec.env", [{"name": "MODELAPP_MODEL_URL", "value": "x"}])], "spec.env[0].name"),
    ("env-bad-name", [("spec.env", [{"name": "1-X", "value": "x"}])], "spec.env[0].name"),
    ("env-duplicate", [("spec.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}])], "spec.env"),
    ("service-type", [("spec.service.type", "ExternalName")], "spec.service.type"),
    ("service-port", [("spec.service.port", 70000)], "spec.service.port"),
    (
        "surge-and-unavailable-zero",
        [("spec.rollout", {"maxSurge": 0, "maxUnavailable": "0%"})],
        "spec.rollout.maxSurge",
    ),
    ("surge-not-percent", [("spec.rollout", {"maxSurge": "lots"})], "spec.rollout.maxSurge"),
    ("deadline-too-short", [("spec.rollout", {"progressDeadlineSeconds": 5})], "spec.rollout.progressDeadlineSeconds"),
    (
        "memory-limit-below-request",
        [("spec.resources", {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}})],
        "spec.resources.limits.memory",
    ),
    ("cpu-not-quantity", [("spec.resources", {"requests": {"cpu": "fast"}})], "spec.resources.requests.cpu"),
    ("cpu-negative-integer", [("spec.resources", {"requests": {"cpu": -1}})], "spec.resources.requests.cpu"),
    ("memory-negative-integer", [("spec.resources", {"requests": {"memory": -1}})], "spec.resources.requests.memory"),
    (
        "account-url-plain-http-public-host",
        [("spec.model.blob.accountUrl", "http://myaccount.blob.core.windows.net")],
        "spec.model.blob.accountUrl",
    ),
    (
        "account-url-port-out-of-range",
        [("spec.model.blob.accountUrl", "https://myaccount.blob.core.windows.net:99999")],
        "spec.model.blob.accountUrl",
    ),
    ("unknown-field-strict", [("spec.replica", 2)], "spec.replica"),
    ("name-too-long-for-service", [("metadata.name", "a" * 64)], "metadata.name"),
]


def test_valid_modelapp_is_accepted(kube: KubeCluster, namespace: str) -> None:
    result = kube.kubectl(
        "apply", "--server-side", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(valid(namespace))
    )
    defaulted = json.loads(result.stdout)["spec"]
    assert defaulted["replicas"] == 1 and defaulted["port"] == 8080
    assert defaulted["rollout"] == {
        "maxSurge": "25%",
        "maxUnavailable": "25%",
        "progressDeadlineSeconds": 600,
        "autoRollback": True,
    }
    assert defaulted["model"]["credentials"]["secretRef"]["key"] == "connectionString"


@pytest.mark.parametrize(("changes", "field"), [(c, f) for _, c, f in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_modelapp_is_rejected_naming_the_field(
    kube: KubeCluster, namespace: str, changes: list[tuple[str, Any]], field: str
) -> None:
    body = copy.deepcopy(valid(namespace))
    for path, value in changes:
        _set(body, path, value)
    result = kube.kubectl(
        "apply", "--server-side", "--field-manager=test", "-f", "-", input=json.dumps(body), check=False
    )
    assert result.returncode != 0, f"accepted: {json.dumps(body['spec'])}"
    assert field in result.stderr, result.stderr


@pytest.mark.parametrize(
    "account_url",
    [
        "https://myaccount.blob.core.windows.net",
        "https://myaccount.blob.core.windows.net:443",
        "http://localhost:10000/devstoreaccount1",
        "http://10.243.0.1:10000/devstoreaccount1",
        "http://azurite.storage.svc:10000/devstoreaccount1",
    ],
)
def test_account_urls_the_blob_contract_accepts_are_accepted(
    kube: KubeCluster, namespace: str, account_url: str
) -> None:
    """Plain http stays allowed where model_blob.is_emulator says the endpoint is the emulator."""
    body = copy.deepcopy(valid(namespace))
    _set(body, "spec.model.blob.accountUrl", account_url)
    kube.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=json.dumps(body))
