"""The rendered children and the status: image by digest, contract env, hardening, conditions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from modelapp_operator.api.modelapp_types import ModelApp, parse_modelapp
from modelapp_operator.names import ANNOTATION_APPLIED_HASH, ANNOTATION_MODEL_VERSION
from modelapp_operator.plan.children import (
    applied_hash,
    build_deployment,
    build_service,
    is_owned_by,
    needs_apply,
    template_release_changed,
)
from modelapp_operator.plan.history import choose_release
from modelapp_operator.plan.release import Release, ResolvedImage, ResolvedModel, pinned_image, release_from_status
from modelapp_operator.plan.status import Condition, Observation, build_status, rollout_state, transition_events
from modelapp_serving.model_blob import normalize_etag

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "ab12" * 16
SHA = "5" * 64
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def make_app(**spec_overrides: Any) -> ModelApp:
    spec: dict[str, Any] = {
        "image": {"repository": "127.0.0.1:5000/team/iris", "tag": "1.0", "pullSecretName": "regcred"},
        "model": {
            "blob": {
                "accountUrl": "http://127.0.0.1:10000/devstoreaccount1",
                "container": "models",
                "name": "iris.onnx",
            },
            "credentials": {"secretRef": {"name": "storage"}},
        },
        "env": [{"name": "LOG_LEVEL", "value": "debug"}],
    }
    spec.update(spec_overrides)
    return parse_modelapp(
        {
            "metadata": {"name": "iris", "namespace": "ml", "uid": "u1", "generation": 2, "labels": {"team": "a"}},
            "spec": spec,
        }
    )


def make_release(digest: str = DIGEST, etag: str = '"0x8DC1"', fmt: str = "onnx") -> Release:
    return Release(
        image=ResolvedImage(repository="127.0.0.1:5000/team/iris", digest=digest, tag="1.0"),
        model=ResolvedModel(
            url="http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx", version=etag, sha256=SHA, format=fmt
        ),
    )


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_a_replaced_pod_keeps_serving_until_its_endpoint_is_gone() -> None:
    container = build_deployment(make_app(), make_release())["spec"]["template"]["spec"]["containers"][0]
    assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}


def test_deployment_runs_image_by_digest_with_contract_env() -> None:
    deployment = build_deployment(make_app(), make_release())
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == f"127.0.0.1:5000/team/iris@{DIGEST}"
    assert env_of(deployment) == {
        "MODELAPP_MODEL_URL": "http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx",
        "MODELAPP_MODEL_ETAG": '"0x8DC1"',
        "MODELAPP_MODEL_SHA256": SHA,
        "MODELAPP_MODEL_FORMAT": "onnx",
        "MODELAPP_MODEL_CACHE_DIR": "/var/cache/modelapp",
        "MODELAPP_EXIT_ON_REFUSAL": "true",
        "MODELAPP_PORT": "8080",
        "MODELAPP_LIVENESS_PORT": "8081",
        "MODELAPP_IMAGE": f"127.0.0.1:5000/team/iris@{DIGEST}",
        "MODELAPP_MODEL_NAME": "iris",
        "MODELAPP_MODEL_CONNECTION_STRING_FILE": "/var/run/secrets/modelapp/storage/connectionString",
        "LOG_LEVEL": "debug",
    }
    assert pod["metadata"]["annotations"] == {
        "modelapp.io/image-digest": DIGEST,
        "modelapp.io/model-version": '"0x8DC1"',
        "modelapp.io/model-sha256": SHA,
    }
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Liveness is the gunicorn master's, on its own port: busy workers never fail it.
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "liveness"}
    assert container["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "liveness", "containerPort": 8081, "protocol": "TCP"},
    ]


def test_probes_allow_a_slow_start_and_never_kill_a_busy_pod() -> None:
    container = build_deployment(make_app(), make_release())["spec"]["template"]["spec"]["containers"][0]
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    # Liveness starts only once the startup probe passed; the allowance covers ~27 s measured on a busy node
    # several times over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert liveness["timeoutSeconds"] * liveness["failureThreshold"] >= 30
    slow = build_deployment(make_app(probes={"startupSeconds": 900}), make_release())
    slow_startup = slow["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert slow_startup["periodSeconds"] * slow_startup["failureThreshold"] >= 900


def test_startup_probe_ticks_every_second_and_readiness_follows_at_once() -> None:
    # A fast app is Ready within a second of its model loaded (issue 23): the shortest period Kubernetes
    # allows; the threshold keeps the whole allowance.
    container = build_deployment(make_app(probes={"startupSeconds": 300}), make_release())["spec"]["template"]
    startup = container["spec"]["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] == 1
    assert startup["failureThreshold"] == 300
    assert startup["timeoutSeconds"] >= startup["periodSeconds"]


def test_deployment_strategy_and_owner() -> None:
    app = make_app(replicas=3, rollout={"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": 120})
    deployment = build_deployment(app, make_release())
    spec = deployment["spec"]
    assert spec["replicas"] == 3 and spec["progressDeadlineSeconds"] == 120
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    assert deployment["metadata"]["ownerReferences"] == [app.owner_reference()]
    assert is_owned_by(deployment, app)
    assert not is_owned_by({"metadata": {"ownerReferences": [{"uid": "other", "controller": True}]}}, app)
    assert not is_owned_by({"metadata": {}}, app)


def test_pod_template_passes_restricted_and_has_writable_mounts() -> None:
    pod = build_deployment(make_app(), make_release())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    context = pod["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["runAsUser"] == 10001 and context["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    storage = "/var/run/secrets/modelapp/storage"
    assert mounts == {"/var/cache/modelapp": "model-cache", "/tmp": "tmp", storage: "storage-credentials"}
    assert {v["name"] for v in pod["volumes"] if "emptyDir" in v} == {"model-cache", "tmp"}
    # The storage Secret's one key as a read-only file (mode 0440, group fsGroup): never a value in env.
    secret = next(v["secret"] for v in pod["volumes"] if v["name"] == "storage-credentials")
    assert secret == {"secretName": "storage", "items": [{"key": "connectionString", "path": "connectionString"}],
                      "defaultMode": 0o440}  # fmt: skip
    assert next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == storage)["readOnly"] is True
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in pod["containers"][0]["env"])


def test_workload_identity_and_pickle() -> None:
    app = make_app(
        model={
            "blob": {"accountUrl": "https://acct.blob.core.windows.net", "container": "models", "name": "m.pkl"},
            "format": "pickle",
            "allowPickle": True,
            "credentials": {"serviceAccountName": "iris-sa", "clientId": "00000000-0000-0000-0000-000000000001"},
        }
    )
    deployment = build_deployment(app, make_release(fmt="pickle"))
    pod = deployment["spec"]["template"]
    env = env_of(deployment)
    assert pod["spec"]["serviceAccountName"] == "iris-sa"
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert env["AZURE_CLIENT_ID"] == "00000000-0000-0000-0000-000000000001"
    assert env["MODELAPP_ALLOW_PICKLE"] == "true"
    assert "MODELAPP_MODEL_CONNECTION_STRING" not in env and "MODELAPP_MODEL_CONNECTION_STRING_FILE" not in env
    assert all(v["name"] != "storage-credentials" for v in pod["spec"]["volumes"])


def test_modelapp_labels_do_not_reach_the_pod_template() -> None:
    app = make_app()
    relabelled = parse_modelapp(
        {
            "metadata": {
                "name": "iris",
                "namespace": "ml",
                "uid": "u1",
                "generation": 2,
                "labels": {"team": "b"},
                "annotations": {"note": "x"},
            },
            "spec": app.spec.model_dump(by_alias=True, exclude_none=True),
        }
    )
    assert build_deployment(app, make_release()) == build_deployment(relabelled, make_release())


def test_applied_hash_tracks_content() -> None:
    one = build_deployment(make_app(), make_release())
    same = build_deployment(make_app(), make_release())
    scaled = build_deployment(make_app(replicas=2), make_release())
    assert applied_hash(one) == applied_hash(same) is not None
    assert applied_hash(one) != applied_hash(scaled)
    assert not template_release_changed(one, scaled)
    assert template_release_changed(one, build_deployment(make_app(), make_release(etag='"0x8DC2"')))
    assert template_release_changed(None, one)
    assert ANNOTATION_APPLIED_HASH in one["metadata"]["annotations"]
    assert ANNOTATION_MODEL_VERSION not in one["metadata"].get("annotations", {})


def test_service() -> None:
    app = make_app(service={"type": "NodePort", "port": 8000})
    service = build_service(app)
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "modelapp", "app.kubernetes.io/instance": "iris"}
    assert service["metadata"]["ownerReferences"][0]["uid"] == "u1"


def test_choose_release_keeps_deployed_pair_when_a_side_fails() -> None:
    app = make_app()
    release = make_release()
    assert choose_release(app.spec, release.image, release.model, {}) == release
    assert choose_release(app.spec, None, release.model, {}) is None
    status = build_status({}, _obs(release, _rollout(1, complete=True)), NOW)
    assert release_from_status(status) == release
    newer = make_release(digest="sha256:" + "c" * 64)
    assert choose_release(app.spec, newer.image, None, status) == release


def test_pinned_image() -> None:
    app = make_app(image={"repository": "127.0.0.1:5000/team/iris", "digest": DIGEST})
    assert pinned_image(app.spec, {}) == ResolvedImage("127.0.0.1:5000/team/iris", DIGEST)
    following = make_app()
    status = {"image": {"repository": "127.0.0.1:5000/team/iris", "tag": "1.0", "digest": DIGEST}}
    assert pinned_image(following.spec, status) is None
    fixed = make_app(image={"repository": "127.0.0.1:5000/team/iris", "tag": "1.0", "followTag": False})
    assert pinned_image(fixed.spec, status) == ResolvedImage("127.0.0.1:5000/team/iris", DIGEST, "1.0")
    retagged = make_app(image={"repository": "127.0.0.1:5000/team/iris", "tag": "2.0", "followTag": False})
    assert pinned_image(retagged.spec, status) is None


def test_normalize_etag() -> None:
    assert normalize_etag('"0x8D"') == normalize_etag("0x8D") == normalize_etag('W/"0x8D"')


def _rollout(n: int, *, complete: bool = False, deadline: bool = False, generation: int = 1) -> dict[str, Any]:
    conditions = []
    if deadline:
        conditions.append({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"})
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": generation,
            "replicas": n,
            "readyReplicas": n if complete else 0,
            "updatedReplicas": n,
            "availableReplicas": n if complete else 0,
            "conditions": conditions,
        },
    }


def _obs(release: Release | None, deployment: dict[str, Any] | None, **kwargs: Any) -> Observation:
    args: dict[str, Any] = {
        "generation": 2,
        "desired_replicas": 1,
        "image": Condition("ImageResolved", "True", "Resolved", "ok"),
        "model": Condition("ModelResolved", "True", "Resolved", "ok"),
        "release": release,
        "rollout": rollout_state(deployment, 1),
    }
    args.update(kwargs)
    return Observation(**args)


def conditions_of(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_ready_after_rollout() -> None:
    status = build_status({}, _obs(make_release(), _rollout(1, complete=True)), NOW)
    assert conditions_of(status) == {
        "Ready": ("True", "Available"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
        "ImageResolved": ("True", "Resolved"),
        "ModelResolved": ("True", "Resolved"),
    }
    assert status["observedGeneration"] == 2
    assert status["image"]["shortDigest"] == "ab12ab12ab12"
    assert status["image"]["reference"].endswith("@" + DIGEST)
    assert status["model"]["version"] == '"0x8DC1"' and status["model"]["sha256"] == SHA
    assert status["replicaSummary"] == "1/1" and status["readyReplicas"] == 1
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])


def test_status_rolling_out_and_deadline() -> None:
    rolling = build_status({}, _obs(make_release(), _rollout(1)), NOW)
    assert conditions_of(rolling)["Ready"] == ("False", "RollingOut")
    assert conditions_of(rolling)["Progressing"] == ("True", "RollingOut")
    stale = _rollout(1, complete=True, generation=5)
    stale["status"]["observedGeneration"] = 4
    assert conditions_of(build_status({}, _obs(make_release(), stale), NOW))["Ready"][0] == "False"
    failed = build_status({}, _obs(make_release(), _rollout(1, deadline=True)), NOW)
    assert conditions_of(failed)["Ready"] == ("False", "ProgressDeadlineExceeded")
    assert conditions_of(failed)["Degraded"] == ("True", "ProgressDeadlineExceeded")


def test_status_before_first_resolution_and_when_blocked() -> None:
    failing = Condition("ImageResolved", "False", "RegistryUnavailable", "connection refused")
    status = build_status({}, _obs(None, None, image=failing), NOW)
    assert conditions_of(status)["Ready"] == ("False", "RegistryUnavailable")
    assert "image" not in status and status["replicaSummary"] == "0/1"
    blocked = Condition("Ready", "False", "NameConflict", "Deployment ml/iris is not owned by this ModelApp")
    status = build_status({}, _obs(make_release(), None, blocked=blocked), NOW)
    assert conditions_of(status)["Ready"] == ("False", "NameConflict")


def test_resolution_failure_while_running_is_degraded_not_unready() -> None:
    failing = Condition("ModelResolved", "False", "BlobUnavailable", "timeout")
    status = build_status({}, _obs(make_release(), _rollout(1, complete=True), model=failing), NOW)
    assert conditions_of(status)["Ready"] == ("True", "Available")
    assert conditions_of(status)["Degraded"] == ("True", "BlobUnavailable")


def test_last_transition_time_moves_only_on_status_change() -> None:
    first = build_status({}, _obs(make_release(), _rollout(1)), NOW)
    later = NOW + timedelta(minutes=5)
    second = build_status(first, _obs(make_release(), _rollout(1)), later)
    assert first["conditions"] == second["conditions"]
    third = build_status(second, _obs(make_release(), _rollout(1, complete=True)), later)
    times = {c["type"]: c["lastTransitionTime"] for c in third["conditions"]}
    assert times["Ready"] == "2026-01-02T03:09:05Z"
    assert times["ImageResolved"] == "2026-01-02T03:04:05Z"


def test_status_keeps_fields_it_does_not_own() -> None:
    previous = {"history": [{"imageDigest": DIGEST}]}
    assert build_status(previous, _obs(make_release(), None), NOW)["history"] == previous["history"]


def test_needs_apply_on_change_or_drift() -> None:
    desired = build_deployment(make_app(), make_release())
    assert needs_apply(None, desired)
    assert not needs_apply(desired, desired)
    assert needs_apply(build_deployment(make_app(replicas=3), make_release()), desired)
    scaled = json.loads(json.dumps(desired))
    scaled["spec"]["replicas"] = 5  # kubectl scale
    assert needs_apply(scaled, desired)
    edited = json.loads(json.dumps(desired))
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "example.com/other:1"  # kubectl set image
    assert needs_apply(edited, desired)
    defaulted = json.loads(json.dumps(desired))
    defaulted["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"  # server defaults are no drift
    defaulted["status"] = {"replicas": 2}
    assert not needs_apply(defaulted, desired)
    service = build_service(make_app())
    moved = json.loads(json.dumps(service))
    moved["spec"]["ports"][0]["port"] = 81
    assert needs_apply(moved, service) and not needs_apply(service, service)


def test_transition_events() -> None:
    rolling = build_status({}, _obs(make_release(), _rollout(1)), NOW)
    assert transition_events({}, rolling) == []  # RollingOut is expected, not a failure
    ready = build_status(rolling, _obs(make_release(), _rollout(1, complete=True)), NOW)
    assert [(e.type, e.reason) for e in transition_events(rolling, ready)] == [("Normal", "Ready")]
    assert transition_events(ready, ready) == []
    failing = Condition("ImageResolved", "False", "RegistryUnavailable", "connection refused")
    degraded = build_status(ready, _obs(make_release(), _rollout(1, complete=True), image=failing), NOW)
    assert [(e.type, e.reason) for e in transition_events(ready, degraded)] == [
        ("Warning", "RegistryUnavailable"),  # ImageResolved
        ("Warning", "RegistryUnavailable"),  # Degraded
    ]
    deadline = build_status(ready, _obs(make_release(), _rollout(1, deadline=True)), NOW)
    assert ("Warning", "ProgressDeadlineExceeded") in [(e.type, e.reason) for e in transition_events(ready, deadline)]
