"""deploy/: the kustomize base, tenant and AKS overlay, read as files (the cluster tests apply them):
the CRD copy is current, RBAC is least privilege, the operator Deployment is restricted and probed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_operator.api.modelapp_types import parse_modelapp
from modelapp_operator.config import OperatorConfig
from modelapp_operator.plan.sources import AZURE_REGISTRY_DEFAULT

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(folder: str) -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / folder / "kustomization.yaml").read_text())
    assert isinstance(document, dict)
    return document


def one(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents(path) if d["kind"] == kind]
    return found


def test_base_takes_the_crd_from_the_crds_folder() -> None:
    base = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert "../../crds" in base["resources"]
    crds = yaml.safe_load((REPO_ROOT / "crds" / "kustomization.yaml").read_text())
    assert crds["resources"] == ["modelapp.yaml"]


def test_top_level_kustomization_is_base_plus_tenant() -> None:
    assert kustomization(".")["resources"] == ["base", "tenant"]
    for folder in ("base", "tenant", "overlays/aks"):
        for resource in kustomization(folder)["resources"]:
            assert (DEPLOY / folder / resource).exists(), f"{folder}: {resource} is missing"


def test_namespaces_enforce_pod_security_restricted() -> None:
    for path in (DEPLOY / "base" / "namespace.yaml", DEPLOY / "tenant" / "namespace.yaml"):
        labels = one(path, "Namespace")["metadata"]["labels"]
        assert RESTRICTED.items() <= labels.items()


def rules(path: Path, kind: str) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in one(path, kind)["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_cluster_role_only_reads_crds_and_namespaces() -> None:
    assert rules(DEPLOY / "base" / "clusterrole.yaml", "ClusterRole") == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
        ("", "namespaces"): {"list", "watch"},
    }


def test_namespaced_role_grants_exactly_what_the_operator_uses() -> None:
    granted = rules(DEPLOY / "tenant" / "role.yaml", "Role")
    assert granted == {
        ("modelapp.io", "modelapps"): {"get", "list", "watch"},  # it writes only their status
        ("modelapp.io", "modelapps/status"): {"get", "patch"},
        ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
        ("autoscaling", "horizontalpodautoscalers"): {"get", "create", "patch", "delete"},  # spec.autoscaling
        ("", "pods"): {"list"},  # a stalled rollout's pods: the app's refusal (termination message)
        ("", "services"): {"get", "list", "watch", "create", "patch"},  # the watch feeds the operator's copy
        ("", "secrets"): {"get"},
        ("", "configmaps"): {"get"},  # the public key of spec.model.signature
        ("", "events"): {"create", "patch", "list"},
        ("events.k8s.io", "events"): {"create", "patch"},
    }
    binding = one(DEPLOY / "tenant" / "role.yaml", "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "modelapp-operator", "namespace": "modelapp-system"}
    ]


def test_operator_watches_only_the_namespaces_it_has_a_role_in() -> None:
    (generator,) = kustomization("base")["configMapGenerator"]
    settings = dict(literal.split("=", 1) for literal in generator["literals"])
    config = OperatorConfig.from_env(settings)  # the operator would start with these
    assert config.namespaces == (kustomization("tenant")["namespace"],)
    assert kustomization("base")["namespace"] == "modelapp-system"


def test_operator_deployment_is_two_replicas_one_active_restricted_and_probed() -> None:
    deployment = one(DEPLOY / "base" / "deployment.yaml", "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pdb = one(DEPLOY / "base" / "pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"] == spec["selector"]
    assert "pdb.yaml" in kustomization("base")["resources"]
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "modelapp-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    (generator,) = kustomization("base")["configMapGenerator"]
    assert container["envFrom"] == [{"configMapRef": {"name": generator["name"]}}]
    settings = dict(literal.split("=", 1) for literal in generator["literals"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert ports == {
        "liveness": int(settings["MODELAPP_LIVENESS_PORT"]),
        "webhooks": int(settings["MODELAPP_RECEIVER_PORT"]),
        "metrics": int(settings["MODELAPP_METRICS_PORT"]),
    }
    # The receiver's token only ever comes from the Secret (never a literal in deploy/).
    env = {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}
    assert env["MODELAPP_RECEIVER_ENABLED"] == "true" and "MODELAPP_RECEIVER_TOKEN" not in settings
    # Leader election: a Lease in the operator's own namespace; each replica is its pod (downward API).
    assert env["MODELAPP_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["MODELAPP_POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    election = OperatorConfig.from_env(
        {**settings, "MODELAPP_LEADER_ELECTION": str(env["MODELAPP_LEADER_ELECTION"])}
        | {"MODELAPP_POD_NAME": "modelapp-operator-abc", "MODELAPP_POD_NAMESPACE": "modelapp-system"}
    ).leader_election
    assert election is not None and election.namespace == kustomization("base")["namespace"]
    assert "leader-election.yaml" in kustomization("base")["resources"]
    assert rules(DEPLOY / "base" / "leader-election.yaml", "Role") == {
        ("coordination.k8s.io", "leases"): {"create", "get", "update"},
        ("", "pods"): {"get"},
    }
    (named,) = [r for r in one(DEPLOY / "base" / "leader-election.yaml", "Role")["rules"] if "update" in r["verbs"]]
    assert named["resourceNames"] == [election.lease_name]  # it can update no other Lease
    mount = next(m for m in container["volumeMounts"] if m["name"] == "receiver-token")
    assert env["MODELAPP_RECEIVER_TOKEN_FILE"].startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == "receiver-token")
    assert volume["secret"]["secretName"] == "modelapp-receiver-token"


def test_aks_overlay_sets_workload_identity() -> None:
    overlay = kustomization("overlays/aks")
    patches = {p["target"]["kind"]: yaml.safe_load(p["patch"]) for p in overlay["patches"]}
    annotations = patches["ServiceAccount"]["metadata"]["annotations"]
    assert "azure.workload.identity/client-id" in annotations
    labels = patches["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert labels == {"azure.workload.identity/use": "true"}
    assert overlay["images"][0]["newName"].endswith(".azurecr.io/modelapp-operator")
    app_account = one(DEPLOY / "overlays" / "aks" / "app-serviceaccount.yaml", "ServiceAccount")
    assert "azure.workload.identity/client-id" in app_account["metadata"]["annotations"]


def test_sample_modelapp_is_valid_and_uses_the_aks_app_identity() -> None:
    sample = one(DEPLOY / "samples" / "modelapp.yaml", "ModelApp")
    # As the API server would return it: with the uid and generation it adds.
    sample["metadata"] |= {"uid": "00000000-0000-0000-0000-000000000000", "generation": 1}
    app = parse_modelapp(sample)
    assert app.namespace == kustomization("tenant")["namespace"]
    account = one(DEPLOY / "overlays" / "aks" / "app-serviceaccount.yaml", "ServiceAccount")
    assert app.spec.model.credentials.service_account_name == account["metadata"]["name"]


def test_operator_image_runs_the_operator_as_non_root() -> None:
    text = (REPO_ROOT / "Dockerfile.operator").read_text()
    assert "USER 10001:10001" in text and 'ENTRYPOINT ["modelapp-operator"]' in text
    assert "--require-hashes" in text and "-r requirements/operator-lock.txt" in text


def test_modelapp_roles_aggregate_into_the_built_in_ones_and_split_the_spec() -> None:
    path = DEPLOY / "base" / "modelapp-roles.yaml"
    roles = {d["metadata"]["name"]: d for d in documents(path)}
    assert "modelapp-roles.yaml" in kustomization("base")["resources"]

    def aggregated(name: str) -> set[str]:
        labels = roles[name]["metadata"]["labels"]
        return {key.rsplit("-", 1)[1] for key, value in labels.items() if "aggregate-to-" in key and value == "true"}

    def granted(name: str) -> dict[tuple[str, str], set[str]]:
        found: dict[tuple[str, str], set[str]] = {}
        for rule in roles[name]["rules"]:
            for resource in rule["resources"]:
                found.setdefault(("".join(rule["apiGroups"]), resource), set()).update(rule["verbs"])
        return found

    assert aggregated("modelapp-view") == {"view"} and aggregated("modelapp-edit") == {"edit", "admin"}
    read = {"get", "list", "watch"}
    assert granted("modelapp-view") == {
        ("modelapp.io", "modelapps"): read,
        ("modelapp.io", "modelapps/status"): read,
        ("modelapp.io", "modelapps/scale"): read,
    }
    assert granted("modelapp-edit") == {
        ("modelapp.io", "modelapps"): {"create", "update", "patch", "delete", "deletecollection", "set-image",
                                       "set-model"},
        ("modelapp.io", "modelapps/scale"): {"update", "patch"},  # never status: the operator's
    }  # fmt: skip
    # One job each: the verb the admission policy modelapp-field-rights asks for, and patch to carry it.
    assert granted("modelapp-ci") == {("modelapp.io", "modelapps"): {"get", "patch", "set-image"}}
    assert granted("modelapp-model-publisher") == {("modelapp.io", "modelapps"): {"get", "patch", "set-model"}}
    assert aggregated("modelapp-ci") == aggregated("modelapp-model-publisher") == set()
    bindings = {d["metadata"]["name"]: d for d in documents(DEPLOY / "overlays" / "aks" / "ci-rolebinding.yaml")}
    assert {name: b["roleRef"]["name"] for name, b in bindings.items()} == {
        "modelapp-ci": "modelapp-ci",
        "modelapp-model-publisher": "modelapp-model-publisher",
    }
    assert all(b["roleRef"]["kind"] == "ClusterRole" and len(b["subjects"]) == 1 for b in bindings.values())


def test_admission_policies_are_bound_to_deny_and_name_their_rule() -> None:
    path = DEPLOY / "base" / "admission-policies.yaml"
    assert "admission-policies.yaml" in kustomization("base")["resources"]
    found = documents(path)
    policies = {d["metadata"]["name"]: d for d in found if d["kind"] == "ValidatingAdmissionPolicy"}
    bindings = {d["spec"]["policyName"]: d for d in found if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    assert (
        set(policies) == set(bindings) == {"modelapp-field-rights", "modelapp-allow-lists", "modelapp-metadata-limits"}
    )
    for name, policy in policies.items():
        assert policy["apiVersion"] == "admissionregistration.k8s.io/v1" and policy["spec"]["failurePolicy"] == "Fail"
        assert bindings[name]["spec"]["validationActions"] == ["Deny"]
        (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
        assert (rule["apiGroups"], rule["resources"]) == (["modelapp.io"], ["modelapps"])  # not status, not scale
        for validation in policy["spec"]["validations"]:
            assert f"rule {name}" in " ".join(validation["messageExpression"].split()), validation
    # The allow-lists' cluster-wide registries: a ConfigMap of the operator's namespace, the operator's default.
    param_ref = bindings["modelapp-allow-lists"]["spec"]["paramRef"]
    (params,) = [d for d in found if d["kind"] == "ConfigMap"]
    assert (param_ref["name"], param_ref["namespace"]) == (
        params["metadata"]["name"],
        kustomization("base")["namespace"],
    )
    assert param_ref["parameterNotFoundAction"] == "Deny"
    assert params["data"]["registries"] == AZURE_REGISTRY_DEFAULT


def test_tenant_template_has_allow_lists_and_a_modelapp_quota() -> None:
    annotations = one(DEPLOY / "tenant" / "namespace.yaml", "Namespace")["metadata"]["annotations"]
    assert set(annotations) == {
        "modelapp.io/allowed-service-accounts",
        "modelapp.io/allowed-secrets",
        "modelapp.io/allowed-registries",
    }
    sample = one(DEPLOY / "samples" / "modelapp.yaml", "ModelApp")
    assert sample["spec"]["model"]["credentials"]["serviceAccountName"] in annotations[
        "modelapp.io/allowed-service-accounts"
    ].split(",")
    # Applied apart, after the CRD (kustomization.yaml says why): with it, a first install refused every create.
    assert "quota.yaml" not in kustomization("tenant")["resources"]
    assert "ci-role.yaml" not in kustomization("tenant")["resources"]  # the pipelines' roles are ClusterRoles now
    quota = one(DEPLOY / "tenant" / "quota.yaml", "ResourceQuota")
    assert quota["spec"]["hard"] == {"count/modelapps.modelapp.io": "100"}
