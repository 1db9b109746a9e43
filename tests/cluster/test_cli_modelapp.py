"""`modelapp` against the real API server (no operator here: status is written by the test, as the
operator would write it): set-image, set-model, status, wait verdicts, rollback, and one-line errors
for not found and forbidden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_localstack import KubeCluster
from modelapp_localstack.operator import apply_crd

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
V1 = '"0x8DC000000000001"'
SHA1 = "1" * 64


def modelapp(*argv: str, kube: KubeCluster, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
    return subprocess.run(
        [sys.executable, "-m", "modelapp_operator.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def namespace(kube: KubeCluster) -> Iterator[str]:
    apply_crd(kube)
    name = f"cli-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false")


def create_app(kube: KubeCluster, namespace: str, name: str) -> None:
    body = {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": {"repository": "127.0.0.1:5000/apps/iris", "tag": "stable", "followTag": True},
            "model": {
                "blob": {
                    "accountUrl": "http://127.0.0.1:10000/devstoreaccount1",
                    "container": "models",
                    "name": "m.onnx",
                },
                "credentials": {"secretRef": {"name": "storage"}},
            },
        },
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))


def get_app(kube: KubeCluster, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(kube.kubectl("get", "modelapp", name, "-n", namespace, "-o", "json").stdout)  # type: ignore[no-any-return]


def write_status(kube: KubeCluster, namespace: str, name: str, status: dict[str, Any]) -> None:
    kube.kubectl(
        "patch", "modelapp", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def ready_status(generation: int, digest: str, **extra: Any) -> dict[str, Any]:
    def condition(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }

    degraded = extra.pop("degraded", ("False", "Healthy", ""))
    return {
        "observedGeneration": generation,
        "image": {"repository": "127.0.0.1:5000/apps/iris", "digest": digest, "reference": f"x@{digest}"},
        "model": {"version": V1, "sha256": SHA1, "format": "onnx"},
        "replicas": 1,
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "replicaSummary": "1/1",
        "conditions": [condition("Ready", "True", "Available"), condition("Degraded", *degraded)],
        **extra,
    }


def test_set_image_pins_the_digest_and_status_shows_it(kube: KubeCluster, namespace: str) -> None:
    create_app(kube, namespace, "pin")
    result = modelapp("set-image", "pin", "-n", namespace, "--digest", NEW, "-o", "json", kube=kube)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["image"] == {"repository": "127.0.0.1:5000/apps/iris", "digest": NEW}
    body = get_app(kube, namespace, "pin")
    assert body["spec"]["image"] == {"repository": "127.0.0.1:5000/apps/iris", "digest": NEW}
    assert body["metadata"]["generation"] == reply["generation"] == 2

    result = modelapp("status", "pin", "-n", namespace, kube=kube)
    assert result.returncode == 0 and "the operator has not reconciled" in result.stdout

    write_status(kube, namespace, "pin", ready_status(2, NEW))
    result = modelapp("status", "pin", "-n", namespace, kube=kube)
    assert result.returncode == 0, result.stderr
    assert f"x@{NEW}" in result.stdout and "1/1 ready" in result.stdout
    summary = json.loads(modelapp("status", "pin", "-n", namespace, "-o", "json", kube=kube).stdout)
    assert summary["image"]["digest"] == NEW and summary["observedGeneration"] == 2


def test_set_model_pins_and_follows(kube: KubeCluster, namespace: str) -> None:
    create_app(kube, namespace, "model")
    result = modelapp("set-model", "model", "-n", namespace, "--version", V1, "--sha256", SHA1, kube=kube)
    assert result.returncode == 0, result.stderr
    assert get_app(kube, namespace, "model")["spec"]["model"]["version"] == V1
    assert modelapp("set-model", "model", "-n", namespace, "--follow", kube=kube).returncode == 0
    assert "version" not in get_app(kube, namespace, "model")["spec"]["model"]


def test_wait_verdicts_against_the_api(kube: KubeCluster, namespace: str) -> None:
    create_app(kube, namespace, "wait")
    assert modelapp("set-image", "wait", "-n", namespace, "--digest", NEW, kube=kube).returncode == 0
    # Ready, but still the old digest: times out with the reason.
    write_status(kube, namespace, "wait", ready_status(2, OLD))
    result = modelapp("wait", "wait", "-n", namespace, "--timeout", "2", "--interval", "0.5", kube=kube)
    assert result.returncode == 7, result.stderr
    assert "not Ready after 2s" in result.stderr and "want image bbbbbbbbbbbb" in result.stderr

    write_status(kube, namespace, "wait", ready_status(2, NEW))
    result = modelapp("wait", "wait", "-n", namespace, "--timeout", "10", "-o", "json", kube=kube)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "Ready"

    rolled_back = ready_status(
        2,
        OLD,
        degraded=("True", "RolledBack", f"image {NEW} failed to become ready; rolled back to {OLD}"),
        failedPairs=[{"imageDigest": NEW, "modelVersion": V1}],
    )
    write_status(kube, namespace, "wait", rolled_back)
    result = modelapp("wait", "wait", "-n", namespace, "--timeout", "10", kube=kube)
    assert result.returncode == 6
    assert result.stderr.strip().splitlines() == [
        f"modelapp: modelapp {namespace}/wait: rollout failed: RolledBack: image {NEW} failed to become ready; "
        f"rolled back to {OLD}"
    ]


def test_rollback_pins_the_previous_ready_pair(kube: KubeCluster, namespace: str) -> None:
    create_app(kube, namespace, "back")
    history = [
        {"revision": 2, "imageDigest": NEW, "modelVersion": V1, "modelSha256": SHA1, "outcome": "Ready",
         "startedAt": "2026-01-01T00:00:00Z", "finishedAt": None, "reason": "Available"},
        {"revision": 1, "imageDigest": OLD, "modelVersion": V1, "modelSha256": SHA1, "outcome": "Ready",
         "startedAt": "2025-12-31T00:00:00Z", "finishedAt": "2026-01-01T00:00:00Z", "reason": "Initial"},
    ]  # fmt: skip
    write_status(kube, namespace, "back", ready_status(1, NEW, history=history))
    assert "history" in get_app(kube, namespace, "back")["status"], "the CRD must keep status.history"
    result = modelapp("rollback", "back", "-n", namespace, kube=kube)
    assert result.returncode == 0, result.stderr
    assert "rolling back to revision 1" in result.stdout
    spec = get_app(kube, namespace, "back")["spec"]
    assert spec["image"] == {"repository": "127.0.0.1:5000/apps/iris", "digest": OLD}
    assert spec["model"]["version"] == V1 and spec["model"]["sha256"] == SHA1

    result = modelapp("rollback", "back", "-n", namespace, "--to-revision", "7", kube=kube)
    assert result.returncode == 1 and "no revision 7" in result.stderr


def test_not_found_is_one_line_with_exit_3(kube: KubeCluster, namespace: str) -> None:
    for argv in (
        ["status", "absent"],
        ["set-image", "absent", "--digest", NEW],
        ["wait", "absent"],
        ["rollback", "absent"],
    ):
        result = modelapp(*argv, "-n", namespace, kube=kube)
        assert result.returncode == 3, (argv, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f'modelapp: ModelApp {namespace}/absent: not found (modelapps.modelapp.io "absent" not found)'
        ]


def test_rejected_patch_is_one_line(kube: KubeCluster, namespace: str) -> None:
    create_app(kube, namespace, "reject")
    result = modelapp("set-image", "reject", "-n", namespace, "--digest", NEW, "--repository", "no-host", kube=kube)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "rejected by the API server" in lines[0] and "spec.image.repository" in lines[0]


def test_forbidden_is_one_line_with_exit_4(kube: KubeCluster, namespace: str, tmp_path: Path) -> None:
    kube.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    token = kube.kubectl("create", "token", "nobody", "-n", namespace).stdout.strip()
    config = tmp_path / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": kube.server, "certificate-authority": str(kube.ca_file)}}
                ],
                "users": [{"name": "nobody", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "nobody", "namespace": namespace}}],
                "current-context": "c",
            }
        )
    )
    result = modelapp("status", "anything", "--kubeconfig", str(config), kube=kube)
    assert result.returncode == 4, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"modelapp: ModelApp {namespace}/anything: forbidden: ")
    assert f"system:serviceaccount:{namespace}:nobody" in line
