"""The operator as in production (`python -m modelapp_operator`) against the local control plane,
the TLS registry and Azurite: create, roll exactly once, relabel without rolling, delete, pod security,
and leave foreign objects alone."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry
from modelapp_localstack.operator import OperatorProcess

from tests.cluster.helpers import (
    StartOperator,
    apply,
    conditions,
    env_of,
    get,
    modelapp,
    operator_running,
    prepare,
    publish_model,
    replicasets,
    request_reconcile,
    wait_for,
    wait_for_events,
    wait_for_reason,
    wait_ready,
)

pytestmark = pytest.mark.cluster

NAMESPACE_PREFIX = f"op-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def operator(start_operator: StartOperator, registry: Registry, azurite: Azurite) -> OperatorProcess:
    return start_operator(f"{NAMESPACE_PREFIX}-*", secrets=(registry.password, azurite.account_key))


def operator_fields(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in obj["metadata"].get("managedFields", []) if m.get("manager") == "modelapp-operator"]


def test_create_renders_children_by_digest_and_becomes_ready(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))

    body = wait_ready(kube, app, operator)
    deployment = get(kube, "deployment", app)
    service = get(kube, "service", app)
    assert deployment is not None and service is not None

    pod = deployment["spec"]["template"]
    assert pod["spec"]["containers"][0]["image"] == f"{app.repository}@{app.digest}"
    assert pod["metadata"]["annotations"]["modelapp.io/model-version"] == app.model_etag
    assert pod["metadata"]["annotations"]["modelapp.io/model-sha256"] == app.model_sha256
    env = env_of(deployment)
    assert env["MODELAPP_MODEL_URL"] == f"{azurite.blob_endpoint}/models/{app.blob_name}"
    assert env["MODELAPP_MODEL_ETAG"] == app.model_etag
    assert env["MODELAPP_MODEL_SHA256"] == app.model_sha256
    assert env["MODELAPP_MODEL_FORMAT"] == "onnx"
    # The connection string is a file of a Secret volume, never a value in the environment.
    assert env["MODELAPP_MODEL_CONNECTION_STRING_FILE"] == "/var/run/secrets/modelapp/storage/connectionString"
    assert "MODELAPP_MODEL_CONNECTION_STRING" not in env
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"], owner["blockOwnerDeletion"]) == (
        "ModelApp",
        body["metadata"]["uid"],
        True,
        True,
    )
    assert service["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    assert service["spec"]["ports"][0]["port"] == 80

    status = body["status"]
    assert status["image"]["digest"] == app.digest
    assert status["image"]["shortDigest"] == app.digest.removeprefix("sha256:")[:12]
    assert status["model"]["version"] == app.model_etag and status["model"]["sha256"] == app.model_sha256
    assert status["readyReplicas"] == 2 and status["replicaSummary"] == "2/2"
    assert {t: c["status"] for t, c in conditions(body).items()} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
        "ImageResolved": "True",
        "ModelResolved": "True",
        "ModelVerified": "True",
    }
    assert status["model"]["snapshot"] and conditions(body)["ModelVerified"]["reason"] == "Sha256FromMetadata"
    assert "connectionString" not in json.dumps(status) and azurite.account_key not in json.dumps(status)

    table = kube.kubectl("get", "ma", app.name, "-n", app.namespace).stdout
    assert app.digest.removeprefix("sha256:")[:12] in table and "2/2" in table and "True" in table

    wait_for_events(kube, app, {"RolloutStarted", "Ready"}, operator)


def test_template_change_rolls_once_and_relabel_rolls_nothing(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))
    wait_ready(kube, app, operator)
    assert len(replicasets(kube, app)) == 1

    # A change that matters: env. Exactly one new ReplicaSet.
    changed = modelapp(app, azurite, env=[{"name": "LOG_LEVEL", "value": "debug"}])
    apply(kube, changed)
    body = wait_ready(kube, app, operator, generation=2)
    sets = replicasets(kube, app)
    assert len(sets) == 2, [rs["metadata"]["name"] for rs in sets]
    deployment = get(kube, "deployment", app)
    assert deployment is not None and env_of(deployment)["LOG_LEVEL"] == "debug"
    deployment_generation = deployment["metadata"]["generation"]

    # A label on the ModelApp: not a spec change (no new generation), so nothing rolls and the status stays.
    kube.kubectl("label", "modelapp", app.name, "-n", app.namespace, "team=search")
    time.sleep(3)
    deployment = get(kube, "deployment", app)
    assert deployment is not None and deployment["metadata"]["generation"] == deployment_generation
    assert len(replicasets(kube, app)) == 2
    assert "team" not in deployment["spec"]["template"]["metadata"]["labels"]
    relabelled = get(kube, "modelapp", app)
    assert relabelled is not None and relabelled["status"] == body["status"]


def test_moved_tag_and_new_model_each_roll_once(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))
    wait_ready(kube, app, operator)

    # The tag moves; a reconcile request rolls to the new digest.
    new_digest = registry.push_random_image(f"apps/{app.namespace}", "stable")
    assert new_digest != app.digest
    request_reconcile(kube, app)

    def rolled_to(digest: str) -> dict[str, Any] | None:
        body = get(kube, "modelapp", app)
        ready = conditions(body or {}).get("Ready") or {}
        if body and body["status"]["image"]["digest"] == digest and ready.get("status") == "True":
            return body
        return None

    wait_for("rollout of the moved tag", lambda: rolled_to(new_digest), operator)
    assert len(replicasets(kube, app)) == 2

    # A new model version: one more rollout, with the new ETag and sha256 in the pods.
    sha, etag = publish_model(models, app.blob_name, b"model v2")
    request_reconcile(kube, app)

    def model_rolled() -> dict[str, Any] | None:
        body = rolled_to(new_digest)
        return body if body and body["status"]["model"]["version"] == etag else None

    wait_for("rollout of the new model", model_rolled, operator)
    deployment = get(kube, "deployment", app)
    assert deployment is not None
    assert env_of(deployment)["MODELAPP_MODEL_ETAG"] == etag and env_of(deployment)["MODELAPP_MODEL_SHA256"] == sha
    assert len(replicasets(kube, app)) == 3


def test_scaled_or_edited_deployment_is_put_back(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))
    wait_ready(kube, app, operator)
    kube.kubectl("scale", "deployment", app.name, "-n", app.namespace, "--replicas=4")
    kube.kubectl("set", "image", f"deployment/{app.name}", "app=example.com/other:1", "-n", app.namespace)

    def restored() -> bool:
        deployment = get(kube, "deployment", app) or {}
        spec = deployment.get("spec") or {}
        image = spec.get("template", {}).get("spec", {}).get("containers", [{}])[0].get("image")
        return spec.get("replicas") == 2 and image == f"{app.repository}@{app.digest}"

    wait_for("the operator to restore its Deployment", restored, operator)
    wait_ready(kube, app, operator)


def test_deleting_the_modelapp_deletes_its_children(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))
    wait_ready(kube, app, operator)
    kube.kubectl("delete", "modelapp", app.name, "-n", app.namespace, "--wait=true", "--timeout=60s")

    def children_gone() -> bool:
        return get(kube, "deployment", app) is None and get(kube, "service", app) is None

    wait_for("garbage collection of the Deployment and Service", children_gone, operator)


def test_pod_template_is_admitted_under_restricted_pod_security(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/warn": "restricted",
    }
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX, labels=labels)
    apply(kube, modelapp(app, azurite))
    wait_ready(kube, app, operator)  # the ReplicaSet could create its pods

    deployment = get(kube, "deployment", app)
    assert deployment is not None
    template = deployment["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "admission-check", "namespace": app.namespace, "labels": {"check": "psa"}},
        "spec": template["spec"],
    }
    result = kube.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert result.returncode == 0, result.stderr
    assert "violate" not in result.stderr, result.stderr

    # Sanity check that the namespace does enforce: a root pod is refused.
    root = json.loads(json.dumps(pod))
    root["spec"]["securityContext"] = {}
    root["spec"]["containers"][0]["securityContext"] = {"runAsUser": 0}
    refused = kube.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(root), check=False)
    assert refused.returncode != 0 and "restricted" in refused.stderr


def test_foreign_deployment_is_left_alone(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    foreign = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app.name, "namespace": app.namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "someone-else"}},
            "template": {
                "metadata": {"labels": {"app": "someone-else"}},
                "spec": {"containers": [{"name": "c", "image": "example.com/other:1"}]},
            },
        },
    }
    apply(kube, foreign)
    before = get(kube, "deployment", app)
    apply(kube, modelapp(app, azurite))

    body = wait_for_reason(kube, app, operator, "Ready", "NameConflict")
    assert conditions(body)["Ready"]["status"] == "False"
    after = get(kube, "deployment", app)
    assert before is not None and after is not None
    # The controller manager keeps writing this Deployment's status, so compare what a writer of
    # spec or metadata would change (generation counts spec changes), not the resourceVersion.
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["spec"] == before["spec"]
    assert after["metadata"].get("labels") == before["metadata"].get("labels")
    assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
    assert "ownerReferences" not in after["metadata"]
    managers = {entry["manager"] for entry in after["metadata"].get("managedFields", [])}
    assert not {m for m in managers if "modelapp" in m}, managers


def test_missing_blob_is_reported_then_recovered(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    body = modelapp(app, azurite)
    body["spec"]["model"]["blob"]["name"] = f"{app.namespace}/later.onnx"
    apply(kube, body)

    current = wait_for_reason(kube, app, operator, "ModelResolved", "BlobNotFound")
    assert conditions(current)["Ready"]["status"] == "False"
    assert get(kube, "deployment", app) is None

    publish_model(models, f"{app.namespace}/later.onnx", b"late model")
    request_reconcile(kube, app)
    # A reconcile request runs now, not after the failed reconcile's retry delay (30 s for a missing blob).
    wait_ready(kube, app, operator, timeout=25)


def test_restarted_operator_resumes_without_touching_children(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    tmp_path: Path,
) -> None:
    """A restart reconciles every ModelApp once: same desired objects, so nothing is applied and nothing rolls."""
    prefix = f"{NAMESPACE_PREFIX}r"  # not matched by the module's operator
    app = prepare(kube, registry, azurite, models, prefix=prefix)
    secrets = (registry.password, azurite.account_key)
    with operator_running(kube, registry, tmp_path / "first.log", f"{prefix}-*", secrets=secrets) as first:
        apply(kube, modelapp(app, azurite))
        before = wait_ready(kube, app, first)
    deployment_before = get(kube, "deployment", app)
    service_before = get(kube, "service", app)
    assert deployment_before is not None and service_before is not None

    with operator_running(kube, registry, tmp_path / "second.log", f"{prefix}-*", secrets=secrets) as second:
        wait_for(
            "the reconcile at start-up",
            lambda: f"{app.namespace}/{app.name}: reconciled: nothing to apply" in second.log_text(),
            second,
        )
        deployment_after = get(kube, "deployment", app)
        service_after = get(kube, "service", app)
        after = get(kube, "modelapp", app)
    assert deployment_after is not None and service_after is not None and after is not None
    # Not applied again: our field manager's entry is unchanged (the Deployment's status may still move).
    assert operator_fields(deployment_after) == operator_fields(deployment_before)
    assert deployment_after["metadata"]["generation"] == deployment_before["metadata"]["generation"]
    assert service_after["metadata"]["resourceVersion"] == service_before["metadata"]["resourceVersion"]
    assert after["status"] == before["status"]
    assert len(replicasets(kube, app)) == 1


def test_bad_registry_credentials_are_reported_without_leaking_them(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    wrong_password = f"not-{registry.password}-wrong"
    wrong = registry.dockerconfigjson().replace(registry.password, wrong_password)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "regcred", "namespace": app.namespace},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": wrong},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(secret))
    apply(kube, modelapp(app, azurite))

    body = wait_for_reason(kube, app, operator, "ImageResolved", "RegistryUnauthorized")
    assert conditions(body)["Ready"]["status"] == "False"
    assert get(kube, "deployment", app) is None
    events = json.dumps(wait_for_events(kube, app, {"RegistryUnauthorized"}, operator))
    for text in (json.dumps(body), events, operator.log_text()):
        assert wrong_password not in text and registry.password not in text
