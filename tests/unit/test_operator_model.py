"""Parsing a ModelApp body into the typed model: defaults, and one clear field path per error."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from modelapp_operator.api.modelapp_types import ModelApp, SpecError, parse_modelapp

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "a" * 64


def example_body(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "image": {"repository": "registry.example.com/team/iris", "tag": "1.0", "pullSecretName": "regcred"},
        "model": {
            "blob": {"accountUrl": "https://acct.blob.core.windows.net", "container": "models", "name": "iris.onnx"},
            "credentials": {"secretRef": {"name": "storage"}},
        },
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": "iris", "namespace": "ml", "uid": "uid-1", "generation": 3, "labels": {"a": "b"}},
        "spec": spec,
    }


def test_parse_applies_defaults() -> None:
    app = parse_modelapp(example_body())
    assert isinstance(app, ModelApp)
    assert app.name == "iris" and app.namespace == "ml" and app.metadata.generation == 3
    spec = app.spec
    assert spec.replicas == 1 and spec.port == 8080
    assert spec.image.follows_tag and spec.image.registry_host == "registry.example.com"
    assert spec.image.path == "team/iris"
    assert spec.model.credentials.secret_ref is not None
    assert spec.model.credentials.secret_ref.key == "connectionString"
    assert spec.model.blob.url == "https://acct.blob.core.windows.net/models/iris.onnx"
    assert spec.service.type == "ClusterIP" and spec.service.port == 80
    assert spec.rollout.max_surge == "25%" and spec.rollout.progress_deadline_seconds == 600
    assert spec.resources.requests.as_dict() == {"cpu": "100m", "memory": "256Mi"}


def test_azurite_style_account_url_keeps_account_segment() -> None:
    body = example_body()
    body["spec"]["model"]["blob"]["accountUrl"] = "http://127.0.0.1:10000/devstoreaccount1/"
    app = parse_modelapp(body)
    assert app.spec.model.blob.url == "http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx"


def test_follow_tag_false_and_int_quantities() -> None:
    body = example_body(resources={"requests": {"cpu": 1, "memory": "1Gi"}, "limits": {"memory": "2Gi"}})
    body["spec"]["image"]["followTag"] = False
    app = parse_modelapp(body)
    assert not app.spec.image.follows_tag
    assert app.spec.resources.requests.cpu == "1"


def _mutate(path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(example_body())
    target = body
    keys = path.split(".")
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return body


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("spec.image.repository", "iris", "spec.image.repository"),
        ("spec.image.tag", "bad tag", "spec.image.tag"),
        ("spec.image.digest", DIGEST, "spec.image"),
        ("spec.image.pullSecretName", "Bad_Name", "spec.image.pullSecretName"),
        ("spec.model.blob.accountUrl", "ftp://x.example.com", "spec.model.blob.accountUrl"),
        ("spec.model.blob.accountUrl", "https://acct.blob.core.windows.net/?sig=abc", "spec.model.blob.accountUrl"),
        ("spec.model.blob.container", "Models", "spec.model.blob.container"),
        ("spec.model.blob.name", "dir/", "spec.model.blob.name"),
        ("spec.model.sha256", "ABC", "spec.model.sha256"),
        ("spec.model.format", "tensorflow", "spec.model.format"),
        ("spec.model.format", "pickle", "spec.model"),
        ("spec.model.credentials", {}, "spec.model.credentials"),
        ("spec.replicas", -1, "spec.replicas"),
        ("spec.port", 80, "spec.port"),
        ("spec.env", [{"name": "MODELAPP_PORT", "value": "1"}], "spec.env[0].name"),
        ("spec.env", [{"name": "1X"}], "spec.env[0].name"),
        ("spec.env", [{"name": "A"}, {"name": "A"}], "spec.env"),
        ("spec.service", {"type": "External"}, "spec.service.type"),
        ("spec.rollout", {"maxSurge": 0, "maxUnavailable": "0%"}, "spec.rollout"),
        ("spec.rollout", {"progressDeadlineSeconds": 5}, "spec.rollout.progressDeadlineSeconds"),
        ("spec.resources", {"requests": {"cpu": "lots"}}, "spec.resources.requests.cpu"),
        ("spec.resources", {"requests": {"cpu": -1}}, "spec.resources.requests.cpu"),
        ("spec.resources", {"requests": {"memory": -1}}, "spec.resources.requests.memory"),
        ("spec.model.blob.accountUrl", "http://acct.blob.core.windows.net", "spec.model.blob.accountUrl"),
        ("spec.model.blob.accountUrl", "https://acct.blob.core.windows.net:99999", "spec.model.blob.accountUrl"),
        ("spec.surprise", 1, "spec.surprise"),
        ("metadata.name", "x" * 64, "metadata.name"),
    ],
)
def test_invalid_spec_names_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_modelapp(_mutate(path, value))
    assert caught.value.field == field
    assert field in str(caught.value)


def test_client_id_requires_workload_identity_and_owns_azure_client_id() -> None:
    body = example_body()
    body["spec"]["model"]["credentials"] = {
        "serviceAccountName": "iris",
        "clientId": "00000000-0000-0000-0000-000000000001",
    }
    assert parse_modelapp(body).spec.model.credentials.client_id is not None
    body["spec"]["env"] = [{"name": "AZURE_CLIENT_ID", "value": "x"}]
    with pytest.raises(SpecError, match="AZURE_CLIENT_ID"):
        parse_modelapp(body)
    body["spec"]["env"] = []
    body["spec"]["model"]["credentials"] = {
        "secretRef": {"name": "s"},
        "clientId": "00000000-0000-0000-0000-000000000001",
    }
    with pytest.raises(SpecError, match="clientId"):
        parse_modelapp(body)


def test_digest_with_follow_tag_is_rejected() -> None:
    body = example_body()
    body["spec"]["image"] = {"repository": "127.0.0.1:5000/iris", "digest": DIGEST, "followTag": True}
    with pytest.raises(SpecError, match="followTag"):
        parse_modelapp(body)


def test_owner_reference_is_a_blocking_controller_reference() -> None:
    ref = parse_modelapp(example_body()).owner_reference()
    assert ref == {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "name": "iris",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
