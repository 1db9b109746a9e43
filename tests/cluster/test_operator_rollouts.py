"""Safe rollouts with the operator as in production (`python -m modelapp_operator`): a push to the
followed tag or a new model blob rolls the Deployment with no edit of the ModelApp (poller and
webhook receiver), both together roll once, and a rollout that never becomes ready is rolled back
to the last Ready pair, recorded, and not tried again."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry
from modelapp_localstack.operator import OperatorProcess
from modelapp_localstack.registry import MANIFEST_ACCEPT

from tests.cluster import helpers
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
    replicasets,
    wait_for_events,
    wait_ready,
)

pytestmark = pytest.mark.cluster

NAMESPACE_PREFIX = f"ro-{uuid.uuid4().hex[:6]}"
POLL_SECONDS = 1
# An image push reaches the operator at once (webhook); a blob change at the next poll. A window
# longer than the poll interval lets "both at once" become one reconcile, hence one rollout.
COALESCE_SECONDS = 1.5
T = TypeVar("T")


@pytest.fixture(scope="module")
def operator(
    start_operator: StartOperator,
    registry: Registry,
    azurite: Azurite,
    registry_notify_port: int,
    registry_notify_token: str,
) -> OperatorProcess:
    env = {
        "MODELAPP_POLL_INTERVAL_SECONDS": str(POLL_SECONDS),
        "MODELAPP_CHANGE_COALESCE_SECONDS": str(COALESCE_SECONDS),
        "MODELAPP_RECEIVER_TOKEN": registry_notify_token,
        "MODELAPP_RECEIVER_PORT": str(registry_notify_port),
        "MODELAPP_RECEIVER_BIND": "127.0.0.1",
    }
    secrets = (registry.password, azurite.account_key, registry_notify_token)
    return start_operator(f"{NAMESPACE_PREFIX}-*", env, secrets=secrets)


def wait_for(what: str, check: Callable[[], T | None], operator: OperatorProcess, timeout: float = 90) -> T:
    """Polled every 0.1 s: these tests time how fast a push or a new blob reaches the Deployment."""
    return helpers.wait_for(what, check, operator, timeout, interval=0.1)


def template(kube: KubeCluster, app: App) -> dict[str, Any]:
    deployment = get(kube, "deployment", app)
    assert deployment is not None
    return deployment


def image_of(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def start(kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess,
          **spec: Any) -> tuple[App, dict[str, Any]]:  # fmt: skip
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite, **spec))
    return app, wait_ready(kube, app, operator)


def retag(registry: Registry, repository: str, source: str, target: str) -> str:
    """Point `target` at the manifest of `source` (what `docker tag` + `docker push` do); return its digest."""
    status, headers, manifest = registry._request(
        "GET", f"/v2/{repository}/manifests/{source}", headers={"Accept": MANIFEST_ACCEPT}
    )
    assert status == 200, status
    status, _, body = registry._request(
        "PUT", f"/v2/{repository}/manifests/{target}", manifest, {"Content-Type": headers["Content-Type"]}
    )
    assert status == 201, body[:300]
    return headers["Docker-Content-Digest"]


def test_push_to_the_followed_tag_rolls_without_an_edit(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    operator: OperatorProcess,
    registry_notify_port: int,
    registry_notify_token: str,
) -> None:
    app, before = start(kube, registry, azurite, models, operator)
    pushed_at = time.monotonic()
    new_digest = registry.push_random_image(f"apps/{app.namespace}", "stable")
    wait_for(
        "the Deployment to run the new digest",
        lambda: image_of(template(kube, app)) == f"{app.repository}@{new_digest}",
        operator,
    )
    elapsed = time.monotonic() - pushed_at
    print(f"push -> Deployment template: {elapsed:.2f}s (coalescing window {COALESCE_SECONDS}s)")

    def rolled() -> dict[str, Any] | None:
        body = get(kube, "modelapp", app)
        ready = conditions(body or {}).get("Ready") or {}
        return body if body and body["status"]["image"]["digest"] == new_digest and ready["status"] == "True" else None

    body = wait_for("Ready with the new digest", rolled, operator)
    assert body["metadata"]["generation"] == before["metadata"]["generation"]  # no edit of the resource
    assert "modelapp.io/reconcile-requested-at" not in (body["metadata"].get("annotations") or {})
    assert len(replicasets(kube, app)) == 2
    history = body["status"]["history"]
    assert [(e["revision"], e["outcome"], e["imageDigest"]) for e in history] == [
        (2, "Ready", new_digest),
        (1, "Ready", app.digest),
    ]
    assert history[0]["reason"] == "RolloutComplete" and history[0]["finishedAt"]
    # The registry's notification reached the receiver (polling alone would also have found the push).
    stats = urllib.request.Request(
        f"http://127.0.0.1:{registry_notify_port}/stats", headers={"Authorization": f"Bearer {registry_notify_token}"}
    )
    with urllib.request.urlopen(stats, timeout=10) as response:
        assert json.load(response)["received"] >= 1


def test_new_model_version_rolls_without_an_edit(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app, before = start(kube, registry, azurite, models, operator)
    uploaded_at = time.monotonic()
    sha, etag = publish_model(models, app.blob_name, f"model of {app.namespace} v2".encode())
    wait_for(
        "the Deployment to run the new model version",
        lambda: env_of(template(kube, app))["MODELAPP_MODEL_ETAG"] == etag,
        operator,
    )
    print(f"blob upload -> Deployment template: {time.monotonic() - uploaded_at:.2f}s (poll every {POLL_SECONDS}s)")
    deployment = template(kube, app)
    assert env_of(deployment)["MODELAPP_MODEL_SHA256"] == sha
    assert image_of(deployment) == f"{app.repository}@{app.digest}"
    body = wait_ready(kube, app, operator)
    assert body["metadata"]["generation"] == before["metadata"]["generation"]
    assert body["status"]["model"]["version"] == etag
    assert body["status"]["history"][0]["reason"] == "RolloutComplete"
    assert len(replicasets(kube, app)) == 2


def test_image_and_model_changed_together_roll_once(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app, _ = start(kube, registry, azurite, models, operator)
    _, etag = publish_model(models, app.blob_name, f"model of {app.namespace} v2".encode())
    new_digest = registry.push_random_image(f"apps/{app.namespace}", "stable")

    def both() -> bool:
        deployment = template(kube, app)
        return image_of(deployment).endswith(new_digest) and env_of(deployment)["MODELAPP_MODEL_ETAG"] == etag

    wait_for("the Deployment to run the new image and model", both, operator)
    body = wait_ready(kube, app, operator)
    time.sleep(2 * POLL_SECONDS)  # nothing else follows
    assert len(replicasets(kube, app)) == 2, "one rollout: exactly one new ReplicaSet"
    history = (get(kube, "modelapp", app) or {})["status"]["history"]
    assert [(e["revision"], e["outcome"], e["reason"]) for e in history][:1] == [(2, "Ready", "RolloutComplete")]
    assert body["status"]["image"]["digest"] == new_digest and body["status"]["model"]["version"] == etag


def test_rollout_that_never_becomes_ready_is_rolled_back_and_not_retried(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    rollout = {"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": 10}
    app, _ = start(kube, registry, azurite, models, operator, rollout=rollout)
    good = f"{app.repository}@{app.digest}"
    repository = f"apps/{app.namespace}"
    # Stage the broken image under a tag nobody follows, make it never ready, then move the tag.
    bad_digest = registry.push_random_image(repository, "candidate")
    bad = f"{app.repository}@{bad_digest}"
    kube.set_never_ready_images([bad])
    try:
        retag(registry, repository, "candidate", "stable")
        wait_for("the rollout of the broken image", lambda: image_of(template(kube, app)) == bad, operator)
        started = time.monotonic()

        def rolled_back() -> dict[str, Any] | None:
            body = get(kube, "modelapp", app)
            degraded = conditions(body or {}).get("Degraded") or {}
            if body and degraded.get("reason") == "RolledBack" and image_of(template(kube, app)) == good:
                return body
            return None

        wait_for("the automatic rollback", rolled_back, operator, timeout=120)
        print(f"rollout start -> rolled back: {time.monotonic() - started:.1f}s (progressDeadlineSeconds 10)")
        body = wait_ready(kube, app, operator)
        status = body["status"]
        assert status["image"]["digest"] == app.digest
        assert [(e["revision"], e["outcome"], e["imageDigest"]) for e in status["history"]] == [
            (3, "Ready", app.digest),
            (2, "Failed", bad_digest),
            (1, "Ready", app.digest),
        ]
        assert status["history"][0]["rollbackOf"] == 2
        assert status["history"][1]["reason"] == "ProgressDeadlineExceeded"
        assert [(p["imageDigest"], p["modelVersion"]) for p in status["failedPairs"]] == [(bad_digest, app.model_etag)]
        degraded = conditions(body)["Degraded"]
        assert degraded["status"] == "True"
        short_bad, short_good = bad_digest[7:19], app.digest[7:19]
        assert short_bad in degraded["message"] and short_good in degraded["message"]
        warnings = [e for e in wait_for_events(kube, app, {"RolledBack"}, operator) if e["reason"] == "RolledBack"]
        assert len(warnings) == 1 and warnings[0]["type"] == "Warning" and bad_digest in warnings[0]["message"]

        # The tag still names the broken image: polls after the rollback do not try it again.
        deployment_generation = template(kube, app)["metadata"]["generation"]
        sets = len(replicasets(kube, app))
        time.sleep(4 * POLL_SECONDS)
        after = get(kube, "modelapp", app)
        assert after is not None
        assert after["status"]["history"] == status["history"]
        assert after["status"]["failedPairs"] == status["failedPairs"]
        assert template(kube, app)["metadata"]["generation"] == deployment_generation
        assert image_of(template(kube, app)) == good and len(replicasets(kube, app)) == sets
        assert conditions(after)["Ready"]["status"] == "True"
    finally:
        kube.set_never_ready_images([])

    # A new digest on the tag is a new pair: it is tried, and once Ready, Degraded clears.
    fixed = registry.push_random_image(repository, "stable")
    wait_for("the rollout of the fixed image", lambda: image_of(template(kube, app)).endswith(fixed), operator)

    def healthy() -> dict[str, Any] | None:
        body = get(kube, "modelapp", app)
        found = conditions(body or {})
        ready, degraded = found.get("Ready") or {}, found.get("Degraded") or {}
        return body if ready.get("status") == "True" and degraded.get("status") == "False" else None

    body = wait_for("Ready and no longer Degraded", healthy, operator)
    assert body["status"]["image"]["digest"] == fixed
    assert body["status"]["history"][0]["revision"] == 4
