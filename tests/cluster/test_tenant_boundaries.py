"""Tenant boundaries the API server itself enforces (issue 22): deploy/'s ModelApp roles and admission policies on
the real kube-apiserver, exercised by real users (client certificates from the cluster's CA, so RBAC, groups and
the policies' authorizer checks are the API server's own), through `kubectl` and the `modelapp` CLI. No operator
runs here: nothing reconciles, only admission is under test.

Users: a CI identity (group modelapp-ci-test, bound to ClusterRole modelapp-ci), a model publisher (bound to
modelapp-model-publisher), one with both (rollback), an app owner with the built-in `edit` role and a viewer with
`view` (aggregation). The admin of the stack (system:masters) prepares everything and is the platform admin."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_localstack import KubeCluster
from modelapp_localstack.kube import write_kubeconfig
from modelapp_localstack.operator import apply_crd

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
OPERATOR_NAMESPACE = "modelapp-system"
# What deploy/base ships for every tenant; the operator's own objects stay out of this module.
SHIPPED_KINDS = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
SHIPPED_ROLES = {"modelapp-view", "modelapp-edit", "modelapp-ci", "modelapp-model-publisher"}
PARAMS = "modelapp-admission"
CI_GROUP = "modelapp-ci-test"
REGISTRY = "registry.team-a.example:5000"  # only named, never contacted: no operator runs
OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
V1 = '"0x8DC000000000001"'
SHA1 = "1" * 64


@dataclass(frozen=True)
class User:
    name: str
    kubeconfig: Path

    def kubectl(self, kube: KubeCluster, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(kube.binary), "kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def modelapp(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "modelapp_operator.cli", *argv],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
        )  # fmt: skip


@dataclass(frozen=True)
class Tenant:
    namespace: str
    ci: User
    publisher: User
    releaser: User  # both pipeline roles: `modelapp rollback` sets the image and the model
    owner: User
    viewer: User


def shipped(kube: KubeCluster) -> list[dict[str, Any]]:
    """The admission policies, their bindings and params, and the ModelApp ClusterRoles, as kustomize renders
    deploy/base."""
    rendered = yaml.safe_load_all(kube.kubectl("kustomize", str(DEPLOY / "base")).stdout)
    return [
        d for d in rendered
        if d["kind"] in SHIPPED_KINDS
        or (d["kind"] == "ClusterRole" and d["metadata"]["name"] in SHIPPED_ROLES)
        or (d["kind"] == "ConfigMap" and d["metadata"]["name"] == PARAMS)
    ]  # fmt: skip


def as_list(items: list[dict[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def until(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def policies(kube: KubeCluster) -> Iterator[list[dict[str, Any]]]:
    apply_crd(kube)
    created_namespace = kube.kubectl("get", "namespace", OPERATOR_NAMESPACE, check=False).returncode != 0
    if created_namespace:
        kube.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    objects = shipped(kube)
    assert {d["kind"] for d in objects} == SHIPPED_KINDS | {"ClusterRole", "ConfigMap"}
    applied = kube.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=as_list(objects), check=False
    )
    assert applied.returncode == 0, applied.stderr
    yield objects
    kube.kubectl("delete", "--ignore-not-found", "-f", "-", input=as_list(objects))
    if created_namespace:
        kube.kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--wait=false")


def user(kube: KubeCluster, folder: Path, name: str, groups: tuple[str, ...] = ()) -> User:
    """A real user of the API server: a client certificate from the cluster's CA (CN = name, O = groups)."""
    pair = kube.ca.issue(f"user-{name}", name, organizations=groups, client=True)
    config = write_kubeconfig(folder / f"{name}.kubeconfig", kube.server, kube.ca_file, pair.cert, pair.key, name)
    return User(name, config)


def bind(kube: KubeCluster, namespace: str, name: str, cluster_role: str, subject: str) -> None:
    kube.kubectl("create", "rolebinding", name, f"--clusterrole={cluster_role}", subject, "-n", namespace)


def patch_args(tenant: Tenant, name: str, patch: dict[str, Any]) -> tuple[str, ...]:
    return ("patch", "modelapp", name, "-n", tenant.namespace, "--type=merge", "-p", json.dumps(patch))


def wait_for_policies(kube: KubeCluster, tenant: Tenant) -> None:
    """Policies take effect once the API server has compiled them: probe with a patch only a policy refuses."""
    create(kube, tenant.namespace, "probe")

    def refused_once() -> bool:
        if tenant.ci.kubectl(kube, *patch_args(tenant, "probe", {"spec": {"replicas": 3}})).returncode != 0:
            return True
        kube.kubectl(*patch_args(tenant, "probe", {"spec": {"replicas": 1}}))
        return False

    until("modelapp-field-rights to take effect", refused_once)
    kube.kubectl("delete", "modelapp", "probe", "-n", tenant.namespace)


@pytest.fixture(scope="module")
def tenant(
    kube: KubeCluster, policies: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tenant]:
    folder = tmp_path_factory.mktemp("users")
    namespace = f"tenant-{uuid.uuid4().hex[:6]}"
    suffix = namespace.rsplit("-", 1)[1]
    # The platform admin's allow-lists, as deploy/tenant/namespace.yaml carries them.
    kube.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace, "annotations": {
            "modelapp.io/allowed-service-accounts": "iris, iris-v2",
            "modelapp.io/allowed-secrets": "regcred, storage,signing-key",
            "modelapp.io/allowed-registries": REGISTRY,
        }},
    }))  # fmt: skip
    ci = user(kube, folder, f"ci-{suffix}", (CI_GROUP,))
    publisher = user(kube, folder, f"publisher-{suffix}")
    releaser = user(kube, folder, f"releaser-{suffix}")
    owner = user(kube, folder, f"owner-{suffix}")
    viewer = user(kube, folder, f"viewer-{suffix}")
    bind(kube, namespace, "ci", "modelapp-ci", f"--group={CI_GROUP}")
    bind(kube, namespace, "publisher", "modelapp-model-publisher", f"--user={publisher.name}")
    bind(kube, namespace, "releaser-image", "modelapp-ci", f"--user={releaser.name}")
    bind(kube, namespace, "releaser-model", "modelapp-model-publisher", f"--user={releaser.name}")
    bind(kube, namespace, "owner", "edit", f"--user={owner.name}")
    bind(kube, namespace, "viewer", "view", f"--user={viewer.name}")
    found = Tenant(namespace, ci, publisher, releaser, owner, viewer)
    wait_for_policies(kube, found)
    yield found
    kube.kubectl("delete", "namespace", namespace, "--wait=false")


def model(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "blob": {"accountUrl": "https://models.blob.core.windows.net", "container": "models", "name": "iris.onnx"},
        "credentials": {"serviceAccountName": "iris"},
    }
    return spec | changes


def body(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": {"repository": f"{REGISTRY}/team/iris", "digest": OLD, "pullSecretName": "regcred"},
            "model": model(),
            "env": [{"name": "LOG_LEVEL", "value": "info"}],
        },
    }
    document["spec"].update(spec)
    return document


def create(kube: KubeCluster, namespace: str, name: str, **spec: Any) -> None:
    """As the platform admin (system:masters): exempt from the allow-lists, whatever the app names."""
    created = kube.kubectl("create", "-f", "-", input=json.dumps(body(namespace, name, **spec)), check=False)
    assert created.returncode == 0, created.stderr


def spec_of(kube: KubeCluster, tenant: Tenant, name: str) -> dict[str, Any]:
    found = kube.kubectl("get", "modelapp", name, "-n", tenant.namespace, "-o", "json").stdout
    return json.loads(found)["spec"]  # type: ignore[no-any-return]


def refused(result: subprocess.CompletedProcess[str], policy: str, *fields: str) -> str:
    """The API server's refusal: it names the policy (the rule) and each field."""
    assert result.returncode != 0, result.stdout
    text = result.stderr
    assert f"ValidatingAdmissionPolicy '{policy}'" in text and f"rule {policy}" in text, text
    for field in fields:
        assert field in text, text
    return text


# --- rights: each job may change its own part of the spec -------------------------------------------


def test_roles_aggregate_into_the_built_in_ones(kube: KubeCluster, tenant: Tenant) -> None:
    def can(who: User, *args: str) -> bool:
        answer = who.kubectl(kube, "auth", "can-i", *args, "-n", tenant.namespace).stdout.strip()
        assert answer in ("yes", "no")
        return answer == "yes"

    resource = "modelapps.modelapp.io"
    for verb in ("create", "update", "patch", "delete", "set-image", "set-model"):
        assert can(tenant.owner, verb, resource), verb  # the built-in edit, through modelapp-edit
    assert can(tenant.owner, "update", resource, "--subresource=scale")
    assert not can(tenant.owner, "patch", resource, "--subresource=status")  # status is the operator's
    assert can(tenant.viewer, "get", resource) and can(tenant.viewer, "watch", resource)
    assert not can(tenant.viewer, "patch", resource)
    assert can(tenant.ci, "set-image", resource) and can(tenant.ci, "patch", resource)
    assert not can(tenant.ci, "set-model", resource) and not can(tenant.ci, "update", resource)
    assert not can(tenant.ci, "create", resource) and not can(tenant.ci, "get", "secrets")
    assert can(tenant.publisher, "set-model", resource) and not can(tenant.publisher, "set-image", resource)


def test_ci_sets_the_image_with_the_cli(kube: KubeCluster, tenant: Tenant) -> None:
    create(kube, tenant.namespace, "ci-image")
    result = tenant.ci.modelapp("set-image", "ci-image", "-n", tenant.namespace, "--digest", NEW)
    assert result.returncode == 0, result.stderr
    assert spec_of(kube, tenant, "ci-image")["image"]["digest"] == NEW
    # Another repository of the allowed registry, and a tag with followTag: every image field is CI's.
    image = {"repository": f"{REGISTRY}/team/iris-v2", "digest": None, "tag": "2", "followTag": False}
    result = tenant.ci.kubectl(kube, *patch_args(tenant, "ci-image", {"spec": {"image": image}}))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("patch", "fields"),
    [
        ({"spec": {"model": {"credentials": {"serviceAccountName": "iris-v2"}}}},
         ["spec.model.credentials.serviceAccountName"]),
        ({"spec": {"model": {"credentials": {"serviceAccountName": None, "secretRef": {"name": "storage"}}}}},
         ["spec.model.credentials.secretRef", "spec.model.credentials.serviceAccountName"]),
        ({"spec": {"image": {"pullSecretName": "storage"}}}, ["spec.image.pullSecretName"]),
        ({"spec": {"model": {"version": V1}}}, ["spec.model.version"]),
        ({"spec": {"replicas": 50}}, ["spec.replicas"]),
        ({"spec": {"env": [{"name": "LOG_LEVEL", "value": "debug"}]}}, ["spec.env"]),
        ({"metadata": {"labels": {"team": "b"}}}, ["metadata.labels"]),
    ],
    ids=["serviceAccountName", "secretRef", "pullSecretName", "model-version", "replicas", "env", "labels"],
)  # fmt: skip
def test_ci_may_change_nothing_but_the_image(
    kube: KubeCluster, tenant: Tenant, patch: dict[str, Any], fields: list[str]
) -> None:
    name = f"ci-{uuid.uuid4().hex[:6]}"
    create(kube, tenant.namespace, name)
    before = spec_of(kube, tenant, name)
    text = refused(tenant.ci.kubectl(kube, *patch_args(tenant, name, patch)), "modelapp-field-rights", *fields)
    assert tenant.ci.name in text  # who was refused, and why: the verb its role lacks
    assert spec_of(kube, tenant, name) == before


def test_ci_cannot_name_a_registry_the_namespace_does_not_allow(kube: KubeCluster, tenant: Tenant) -> None:
    create(kube, tenant.namespace, "ci-registry")

    def set_image(digest: str, repository: str) -> subprocess.CompletedProcess[str]:
        return tenant.ci.modelapp(
            "set-image", "ci-registry", "-n", tenant.namespace, "--digest", digest, "--repository", repository
        )

    result = set_image(NEW, "attacker.example/iris")
    assert result.returncode == 4, result.stderr  # the CLI's exit code for forbidden
    text = refused(result, "modelapp-allow-lists", "spec.image.repository", "attacker.example")
    assert REGISTRY in text and "*.azurecr.io" in text  # what is allowed: the namespace's and the cluster's
    # The cluster-wide list (ConfigMap modelapp-admission): an Azure registry is allowed in every namespace,
    # one label for `*` and port 443 only.
    azure = set_image(NEW, "team.azurecr.io/iris")
    assert azure.returncode == 0, azure.stderr
    for host in ("a.b.azurecr.io", "team.azurecr.io:8443", "azurecr.io.attacker.example"):
        refused(set_image(OLD, f"{host}/iris"), "modelapp-allow-lists", "spec.image.repository", host)


def test_publisher_sets_the_model_but_not_the_image(kube: KubeCluster, tenant: Tenant) -> None:
    create(kube, tenant.namespace, "publish")
    namespace = ("-n", tenant.namespace)
    result = tenant.publisher.modelapp("set-model", "publish", *namespace, "--version", V1, "--sha256", SHA1)
    assert result.returncode == 0, result.stderr
    pinned = spec_of(kube, tenant, "publish")["model"]
    assert (pinned["version"], pinned["sha256"]) == (V1, SHA1)
    assert tenant.publisher.modelapp("set-model", "publish", *namespace, "--follow").returncode == 0
    result = tenant.publisher.modelapp("set-image", "publish", *namespace, "--digest", NEW)
    refused(result, "modelapp-field-rights", "spec.image.digest", "set-image")
    blob = {"spec": {"model": {"blob": {"name": "other.onnx"}}}}
    refused(tenant.publisher.kubectl(kube, *patch_args(tenant, "publish", blob)), "modelapp-field-rights",
            "spec.model.blob.name")  # fmt: skip
    assert spec_of(kube, tenant, "publish")["image"]["digest"] == OLD


def test_rollback_needs_both_pipeline_roles(kube: KubeCluster, tenant: Tenant) -> None:
    create(kube, tenant.namespace, "rollback", model=model(version=V1))
    history = [
        {"revision": 2, "imageDigest": NEW, "modelVersion": '"0x8DC000000000002"', "startedAt": "2026-01-02T00:00:00Z",
         "outcome": "Failed"},
        {"revision": 1, "imageDigest": OLD, "modelVersion": V1, "modelSha256": SHA1,
         "startedAt": "2026-01-01T00:00:00Z", "outcome": "Ready"},
    ]  # fmt: skip
    kube.kubectl("patch", "modelapp", "rollback", "-n", tenant.namespace, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"history": history}}))  # fmt: skip
    assert tenant.ci.modelapp("set-image", "rollback", "-n", tenant.namespace, "--digest", NEW).returncode == 0
    args = ("rollback", "rollback", "-n", tenant.namespace, "--to-revision", "1", "--no-model-check")
    refused(tenant.ci.modelapp(*args), "modelapp-field-rights", "spec.model.sha256")
    result = tenant.releaser.modelapp(*args)
    assert result.returncode == 0, result.stderr
    spec = spec_of(kube, tenant, "rollback")
    assert (spec["image"]["digest"], spec["model"]["sha256"]) == (OLD, SHA1)


# --- allow-lists: what a ModelApp may name ------------------------------------------------------------


def test_editor_creates_a_modelapp_within_the_allow_lists(kube: KubeCluster, tenant: Tenant) -> None:
    signed = model(signature={"publicKey": {"secretRef": {"name": "signing-key"}}})
    result = tenant.owner.kubectl(kube, "create", "-f", "-", input=json.dumps(body(tenant.namespace, "owned",
                                                                                   model=signed)))  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The owner changes the rest of the spec, within the lists.
    credentials = {"serviceAccountName": None, "secretRef": {"name": "storage"}}
    patch = {
        "spec": {"replicas": 3, "env": [{"name": "LOG_LEVEL", "value": "x"}], "model": {"credentials": credentials}}
    }
    result = tenant.owner.kubectl(kube, *patch_args(tenant, "owned", patch))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        ({"model": model(credentials={"serviceAccountName": "default"})},
         ["spec.model.credentials.serviceAccountName: ServiceAccount default", "lists iris, iris-v2"]),
        ({"model": model(credentials={"secretRef": {"name": "operator-token"}})},
         ["spec.model.credentials.secretRef.name: Secret operator-token", "modelapp.io/allowed-secrets"]),
        ({"model": model(signature={"publicKey": {"secretRef": {"name": "tls-key"}}})},
         ["spec.model.signature.publicKey.secretRef.name: Secret tls-key"]),
        ({"image": {"repository": f"{REGISTRY}/team/iris", "digest": OLD, "pullSecretName": "ci-token"}},
         ["spec.image.pullSecretName: Secret ci-token"]),
        ({"image": {"repository": "docker.io/library/iris", "digest": OLD}},
         ["spec.image.repository: registry docker.io"]),
    ],
    ids=["serviceAccountName", "secretRef", "signature-secretRef", "pullSecretName", "registry"],
)  # fmt: skip
def test_editor_cannot_name_what_the_namespace_does_not_allow(
    kube: KubeCluster, tenant: Tenant, spec: dict[str, Any], fields: list[str]
) -> None:
    name = f"deny-{uuid.uuid4().hex[:6]}"
    result = tenant.owner.kubectl(kube, "create", "-f", "-", input=json.dumps(body(tenant.namespace, name, **spec)))
    refused(result, "modelapp-allow-lists", *fields, f"namespace {tenant.namespace}")
    assert kube.kubectl("get", "modelapp", name, "-n", tenant.namespace, check=False).returncode != 0


def test_a_tighter_list_blocks_no_other_change(kube: KubeCluster, tenant: Tenant) -> None:
    """Only what a request sets or changes is checked: the platform admin may name anything (it could rewrite
    the lists anyway), and a ModelApp that names what a list no longer holds keeps taking its CI's images."""
    create(kube, tenant.namespace, "grandfathered", model=model(credentials={"serviceAccountName": "legacy"}))
    assert tenant.ci.modelapp("set-image", "grandfathered", "-n", tenant.namespace, "--digest", NEW).returncode == 0
    assert tenant.owner.kubectl(kube, *patch_args(tenant, "grandfathered", {"spec": {"replicas": 2}})).returncode == 0
    assert tenant.owner.kubectl(kube, "delete", "modelapp", "grandfathered", "-n", tenant.namespace).returncode == 0


def test_the_tenant_cannot_write_its_own_lists(kube: KubeCluster, tenant: Tenant) -> None:
    patch = json.dumps({"metadata": {"annotations": {"modelapp.io/allowed-service-accounts": "iris,default"}}})
    for who in (tenant.owner, tenant.ci):
        result = who.kubectl(kube, "patch", "namespace", tenant.namespace, "--type=merge", "-p", patch)
        assert result.returncode != 0 and "Forbidden" in result.stderr, result.stderr
        result = who.kubectl(kube, "patch", "configmap", PARAMS, "-n", OPERATOR_NAMESPACE, "--type=merge",
                             "-p", '{"data":{"registries":"*.example.com"}}')  # fmt: skip
        assert result.returncode != 0 and "Forbidden" in result.stderr, result.stderr


# --- sizes and numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"env": [{"name": f"V{i}", "value": "x" * 200} for i in range(30)]}, "spec.env"),
        ({"env": [{"name": f"V{i}", "value": "x"} for i in range(65)]}, "spec.env"),
        ({"resources": {"requests": {"cpu": "1" * 40}}}, "spec.resources.requests.cpu"),
    ],
    ids=["env-characters", "env-items", "quantity-length"],
)
def test_an_oversize_modelapp_is_rejected_naming_the_field(
    kube: KubeCluster, tenant: Tenant, change: dict[str, Any], field: str
) -> None:
    result = tenant.owner.kubectl(kube, "create", "-f", "-", input=json.dumps(body(tenant.namespace, "big", **change)))
    assert result.returncode != 0 and field in result.stderr and "is invalid" in result.stderr, result.stderr


def test_oversize_metadata_is_rejected_naming_the_rule(kube: KubeCluster, tenant: Tenant) -> None:
    document = body(tenant.namespace, "notes")
    document["metadata"]["annotations"] = {f"note-{i}": "x" * 4000 for i in range(9)}
    result = tenant.owner.kubectl(kube, "create", "-f", "-", input=json.dumps(document))
    refused(result, "modelapp-metadata-limits", "metadata.annotations", "32768")
    document["metadata"]["annotations"] = {}
    document["metadata"]["labels"] = {f"l{i}": "x" for i in range(65)}
    result = tenant.owner.kubectl(kube, "create", "-f", "-", input=json.dumps(document))
    refused(result, "modelapp-metadata-limits", "metadata.labels")


def test_the_quota_stops_the_modelapp_after_the_last_allowed(kube: KubeCluster, tenant: Tenant) -> None:
    quota = yaml.safe_load((DEPLOY / "tenant" / "quota.yaml").read_text())
    hard = int(quota["spec"]["hard"]["count/modelapps.modelapp.io"])
    namespace = f"quota-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", namespace)
    try:
        kube.kubectl("apply", "-n", namespace, "-f", str(DEPLOY / "tenant" / "quota.yaml"))

        def counted() -> bool:  # the quota controller counts ModelApps once it has discovered their resource
            found = kube.kubectl("get", "resourcequota", quota["metadata"]["name"], "-n", namespace, "-o", "json")
            return "count/modelapps.modelapp.io" in (json.loads(found.stdout).get("status") or {}).get("used", {})

        until("the quota's status", counted, timeout=180)
        apps = [body(namespace, f"app-{i}") for i in range(hard)]
        created = kube.kubectl("create", "-f", "-", input=as_list(apps), timeout=300, check=False)
        assert created.returncode == 0, created.stderr[-2000:]
        extra = kube.kubectl("create", "-f", "-", input=json.dumps(body(namespace, "one-more")), check=False)
        assert extra.returncode != 0 and "exceeded quota" in extra.stderr, extra.stderr
        assert f"count/modelapps.modelapp.io={hard}" in extra.stderr
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            kube.kubectl("delete", "namespace", namespace, "--wait=false")


# --- the release gate: a person's promote or abort names its own requester -------------------------------


def candidate_testing(kube: KubeCluster, tenant: Tenant, name: str) -> str:
    """A ModelApp whose status says the gate tests a candidate (written as the operator would)."""
    create(kube, tenant.namespace, name)
    gate = {"phase": "Testing", "candidate": {"imageDigest": NEW, "modelVersion": '"0x2"'}}
    kube.kubectl("patch", "modelapp", name, "-n", tenant.namespace, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"gate": gate}}))  # fmt: skip
    return f"{NEW}/0x2"


def test_the_owner_promotes_as_itself_and_no_one_else(kube: KubeCluster, tenant: Tenant) -> None:
    candidate = candidate_testing(kube, tenant, "gated")
    result = tenant.owner.modelapp("promote", "gated", "-n", tenant.namespace)
    assert result.returncode == 0, result.stderr
    assert f"promoting candidate {candidate} as {tenant.owner.name}" in result.stdout
    found = json.loads(kube.kubectl("get", "modelapp", "gated", "-n", tenant.namespace, "-o", "json").stdout)
    annotations = found["metadata"]["annotations"]
    assert annotations["modelapp.io/gate-action"] == f"promote {candidate}"
    assert annotations["modelapp.io/gate-action-by"] == tenant.owner.name
    # Naming someone else is refused by the API server, naming the rule and the real requester.
    forged = {"metadata": {"annotations": {"modelapp.io/gate-action": f"abort {candidate}",
                                           "modelapp.io/gate-action-by": "alice"}}}  # fmt: skip
    text = refused(tenant.owner.kubectl(kube, *patch_args(tenant, "gated", forged)), "modelapp-field-rights",
                   "metadata.annotations[modelapp.io/gate-action-by]")  # fmt: skip
    assert tenant.owner.name in text
    # CI may change the image only: not the gate's decision.
    result = tenant.ci.modelapp("abort", "gated", "-n", tenant.namespace)
    assert result.returncode != 0 and "modelapp-field-rights" in result.stderr, result.stdout
