"""Immutable model versions with the operator process on the real control plane (kwok nodes) and Azurite:
every rolled-out version is pinned to a snapshot the pod template names, `modelapp rollback` to v1 after
v2 overwrote the blob comes back Ready on v1's snapshot (whose bytes are v1's), an automatic rollback
restores v1's snapshot, and an unsigned model under a signature-requiring ModelApp is never rolled out."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry
from modelapp_localstack.operator import OperatorProcess

from tests.cluster.helpers import (
    App,
    StartOperator,
    apply,
    conditions,
    env_of,
    get,
    modelapp,
    prepare,
    publish_model,
    wait_for,
    wait_for_events,
    wait_for_reason,
    wait_ready,
)

pytestmark = pytest.mark.cluster

NAMESPACE_PREFIX = f"mv-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def operator(start_operator: StartOperator, registry: Registry, azurite: Azurite) -> OperatorProcess:
    env = {"MODELAPP_POLL_INTERVAL_SECONDS": "1", "MODELAPP_RECEIVER_ENABLED": "false"}
    return start_operator(f"{NAMESPACE_PREFIX}-*", env, secrets=(registry.password, azurite.account_key))


def cli(kube: KubeCluster, *argv: str, connection_string: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
    if connection_string is not None:  # the storage credentials rollback checks the pinned version with
        env["AZURE_STORAGE_CONNECTION_STRING"] = connection_string
    return subprocess.run(
        [sys.executable, "-m", "modelapp_operator.cli", *argv],
        capture_output=True, text=True, env=env, timeout=180, check=False,
    )  # fmt: skip


def pin_of(kube: KubeCluster, app: App) -> str | None:
    deployment = get(kube, "deployment", app) or {}
    return env_of(deployment).get("MODELAPP_MODEL_PIN") if deployment else None


def snapshot_bytes(models: ContainerClient, app: App, snapshot: str) -> bytes:
    return models.get_blob_client(app.blob_name, snapshot=snapshot).download_blob().readall()


def test_rollback_to_v1_after_v2_overwrote_the_blob_restores_v1s_snapshot(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))
    body = wait_ready(kube, app, operator)
    v1 = body["status"]["model"]
    assert v1["snapshot"] and v1["version"] == app.model_etag
    assert pin_of(kube, app) == f"snapshot={v1['snapshot'].replace(':', '%3A')}"
    v1_bytes = f"model of {app.namespace} v1".encode()
    _, v2_etag = publish_model(models, app.blob_name, f"model of {app.namespace} v2".encode())
    wait_for("v2 rolled out", lambda: (get(kube, "modelapp", app) or {}).get("status", {}).get("model", {})
             .get("version") == v2_etag, operator)  # fmt: skip
    wait_ready(kube, app, operator)

    rolled = cli(kube, "rollback", app.name, "-n", app.namespace, connection_string=azurite.connection_string)
    assert rolled.returncode == 0, rolled.stderr
    waited = cli(kube, "wait", app.name, "-n", app.namespace, "--timeout", "90")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    body = wait_ready(kube, app, operator)
    model = body["status"]["model"]
    assert (model["version"], model["snapshot"]) == (v1["version"], v1["snapshot"])
    assert snapshot_bytes(models, app, model["snapshot"]) == v1_bytes
    assert hashlib.sha256(v1_bytes).hexdigest() == model["sha256"]
    assert pin_of(kube, app) == f"snapshot={v1['snapshot'].replace(':', '%3A')}"
    assert conditions(body)["ModelVerified"]["status"] == "True"


def test_rollback_to_a_pair_whose_snapshot_was_deleted_fails_before_changing_anything(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))
    v1 = wait_ready(kube, app, operator)["status"]["model"]
    _, v2_etag = publish_model(models, app.blob_name, f"model of {app.namespace} v2".encode())
    wait_for("v2 rolled out", lambda: (get(kube, "modelapp", app) or {}).get("status", {}).get("model", {})
             .get("version") == v2_etag, operator)  # fmt: skip
    before = wait_ready(kube, app, operator)
    models.get_blob_client(app.blob_name, snapshot=v1["snapshot"]).delete_blob()

    # Storage unreachable: a distinct exit code, nothing changed.
    with socket.socket() as probe:
        probe.bind((urlsplit(azurite.blob_endpoint).hostname or "", 0))
        closed_port = probe.getsockname()[1]
    parts = urlsplit(azurite.blob_endpoint)
    unreachable = azurite.connection_string.replace(
        azurite.blob_endpoint, parts._replace(netloc=f"{parts.hostname}:{closed_port}").geturl()
    )
    refused = cli(kube, "rollback", app.name, "-n", app.namespace, connection_string=unreachable)
    assert refused.returncode == 9, refused.stdout + refused.stderr
    assert "cannot be reached" in refused.stderr and "nothing changed" in refused.stderr

    rolled = cli(kube, "rollback", app.name, "-n", app.namespace, connection_string=azurite.connection_string)
    assert rolled.returncode == 8, rolled.stdout + rolled.stderr
    assert f"snapshot {v1['snapshot']}" in rolled.stderr and "no longer exists" in rolled.stderr, rolled.stderr
    assert "nothing changed" in rolled.stderr
    after = get(kube, "modelapp", app) or {}
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["status"]["model"]["version"] == v2_etag


def test_automatic_rollback_restores_v1s_snapshot(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    rollout = {"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": 10}
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite, rollout=rollout))
    v1 = wait_ready(kube, app, operator)["status"]["model"]
    # v2 comes with an image kwok never makes ready: the pair (bad image, v2) misses its deadline.
    bad_digest = registry.push_random_image(f"apps/{app.namespace}", "candidate")
    kube.set_never_ready_images([f"{app.repository}@{bad_digest}"])
    try:
        publish_model(models, app.blob_name, f"model of {app.namespace} v2".encode())
        apply(kube, modelapp(app, azurite, rollout=rollout, image={
            "repository": app.repository, "digest": bad_digest, "pullSecretName": "regcred"}))  # fmt: skip

        def rolled_back() -> dict[str, Any] | None:
            body = get(kube, "modelapp", app) or {}
            return body if (conditions(body).get("Degraded") or {}).get("reason") == "RolledBack" else None

        body = wait_for("the automatic rollback", rolled_back, operator, timeout=120)
    finally:
        kube.set_never_ready_images([])
    restored = body["status"]["history"][0]
    assert restored["rollbackOf"] and restored["modelSnapshot"] == v1["snapshot"]
    assert pin_of(kube, app) == f"snapshot={v1['snapshot'].replace(':', '%3A')}"


def test_unsigned_model_under_a_signature_requiring_modelapp_is_never_rolled_out(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    key = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    kube.kubectl("create", "configmap", "model-key", "-n", app.namespace, f"--from-literal=publicKey={key}")
    signature = {"required": True, "publicKey": {"configMapRef": {"name": "model-key"}}}
    body = modelapp(app, azurite)
    body["spec"]["model"]["signature"] = signature
    apply(kube, body)
    found = wait_for_reason(kube, app, operator, "ModelResolved", "SignatureMissing")
    assert conditions(found)["ModelVerified"]["reason"] == "SignatureMissing"
    assert get(kube, "deployment", app) is None  # never rolled out
    wait_for_events(kube, app, {"SignatureMissing"}, operator)
