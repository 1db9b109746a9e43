"""The reconcile's I/O shell, below the cluster tier: the queue, the reconcile, the child refresher and the kopf
handlers wired as the operator wires them, against an in-memory Kubernetes client (tests/unit/fake_kube.py)
and a virtual scheduler. A stale copy's status write conflicts and is planned again from a fresh read;
drift, a missed rollout deadline and a deleted child each come back through the one queue."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from modelapp_operator import handlers
from modelapp_operator.api.modelapp_types import BlobLocation
from modelapp_operator.clients.blob_storage import BlobCredential, BlobProperties
from modelapp_operator.clients.registry import RegistryCredentials
from modelapp_operator.metrics import METRICS, Source
from modelapp_operator.names import API_VERSION, KIND
from modelapp_operator.reconcile.child_refresher import CHILD_REFRESH_COALESCE_SECONDS, ChildRefresher
from modelapp_operator.reconcile.deps import Clients, Dependencies
from modelapp_operator.reconcile.queue import ReconcileQueue
from modelapp_operator.reconcile.reconciler import ReconcileResult, Trigger, reconcile
from modelapp_operator.runtime import Runtime
from modelapp_operator.watch.hub import WatchHub
from modelapp_operator.watch.keys import AppKey

from tests.unit.fake_kube import FakeKube
from tests.unit.virtual_time import VirtualScheduler

pytestmark = pytest.mark.unit

APP: AppKey = ("ml", "iris")
REPOSITORY = "registry.example:5000/team/iris"
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


class Registry:
    """An ImageResolver: the tag points where the test says."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    async def resolve(self, repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        return self.digest


class Storage:
    """A ModelResolver: one published model version."""

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        return BlobProperties(
            etag='"0x1"', size=10, last_modified=None, metadata={"sha256": "b" * 64, "format": "onnx"}
        )


# The kopf handlers (handlers.py) of each watched kind, called as kopf calls them (their kopf typing aside).
HANDLERS: dict[str, Any] = {
    KIND: handlers.on_modelapp,
    "Deployment": handlers.on_child_deployment,
    "Service": handlers.on_child_service_deleted,
}


def modelapp() -> dict[str, Any]:
    blob = {"accountUrl": "https://acct.blob.core.windows.net", "container": "models", "name": "iris.onnx"}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"namespace": APP[0], "name": APP[1]},
        "spec": {
            "image": {"repository": REPOSITORY, "tag": "stable"},
            "model": {"blob": blob, "credentials": {"serviceAccountName": "iris-reader"}},
        },
    }


class Operator:
    """The operator's reconcile wiring (runtime.start's, without kopf, the hub and the receiver)."""

    def __init__(self, *, hub: bool = False) -> None:
        self.kube = FakeKube()
        self.registry = Registry(D1)
        self.clock = VirtualScheduler()
        self.triggers: list[Trigger] = []
        logger = logging.getLogger("test")
        self.queue = ReconcileQueue(self.run, logger, scheduler=self.clock, on_gone=self.gone)
        self.hub = WatchHub(self.registry, Storage(), submit=self.queue.submit, scheduler=self.clock) if hub else None
        if self.hub is not None:
            clients = Clients(kube=self.kube, images=self.hub.images, models=self.hub.models, watch=self.hub)
        else:
            clients = Clients(kube=self.kube, images=self.registry, models=Storage())
        self.deps = Dependencies(clients)
        refresher = ChildRefresher(self.deps, self.queue.submit, logger, scheduler=self.clock)
        self.runtime = Runtime(deps=self.deps, child_refresher=refresher, queue=self.queue)
        self.memo = {"runtime": self.runtime}

    async def run(self, key: AppKey, trigger: Trigger) -> ReconcileResult:
        self.triggers.append(trigger)
        return await reconcile(key, trigger, self.deps)

    def gone(self, key: AppKey) -> None:
        self.runtime.forget(key)

    def get(self, kind: str) -> dict[str, Any]:
        return self.kube.objects[(kind, *APP)]

    async def watch_event(self, kind: str, type_: str = "MODIFIED") -> None:
        """What kopf hands the handlers when the watch reports this object (the ModelApp or a child)."""
        found: Any = self.get(kind) if type_ != "DELETED" else self.deleted
        event = {"type": type_, "object": found}
        await HANDLERS[kind](event=event, body=kopf.Body(found), memo=self.memo)

    async def delete(self, kind: str) -> None:
        self.deleted = self.kube.delete(kind, *APP)
        await self.watch_event(kind, "DELETED")
        await self.clock.advance()

    async def deployment_controller(self, *, ready: bool) -> None:
        """The Deployment controller's verdict on the current template, then its watch event, then the
        child refresher's coalescing wait."""

        def verdict(deployment: dict[str, Any]) -> None:
            replicas = deployment["spec"]["replicas"]
            progressing = (
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
                if ready
                else {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
            )
            deployment["status"] = {
                "observedGeneration": deployment["metadata"]["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas if ready else 0,
                "availableReplicas": replicas if ready else 0,
                "conditions": [progressing],
            }

        self.kube.edit("Deployment", *APP, verdict)
        await self.watch_event("Deployment")
        await self.clock.advance(CHILD_REFRESH_COALESCE_SECONDS)

    async def created_and_ready(self) -> None:
        """A new ModelApp, its first rollout and its pods Ready."""
        self.kube.put(modelapp())
        await self.watch_event(KIND, "ADDED")
        await self.clock.advance()
        await self.deployment_controller(ready=True)
        assert ready(self.get(KIND)) == "True"

    async def close(self) -> None:
        await self.runtime.stop()


def ready(body: Mapping[str, Any]) -> str:
    found = [c for c in body["status"]["conditions"] if c["type"] == "Ready"]
    return str(found[0]["status"])


def image_of(deployment: Mapping[str, Any]) -> str:
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def history(body: Mapping[str, Any]) -> list[tuple[int, str, str]]:
    return [(e["revision"], e["outcome"], e["imageDigest"]) for e in body["status"]["history"]]


def registry_requests(source: Source) -> float:
    labels = {"kind": "registry", "endpoint": "registry.example:5000", "trigger": source}
    return METRICS.registry.get_sample_value("modelapp_operator_upstream_requests_total", labels) or 0.0


@pytest.fixture
async def operator() -> Operator:
    return Operator()


async def test_a_change_a_poll_learned_is_reconciled_through_the_queue_as_the_polls() -> None:
    operator = Operator(hub=True)
    assert operator.hub is not None
    await operator.created_and_ready()
    operator.registry.digest = D2
    before = {source: registry_requests(source) for source in ("poll", "reconcile")}
    await operator.hub.poll_once()  # the poll learns of the new digest: the ModelApp is submitted as (key, poll)
    operator.clock.now += 3600  # and the cache expires before the reconcile runs: it asks the registry again
    await operator.clock.advance(1.0)
    assert operator.triggers == ["event", "poll"]
    assert image_of(operator.get("Deployment")) == f"{REPOSITORY}@{D2}"
    # Both requests count as the poll's: the reconcile's own read is made on its behalf.
    assert registry_requests("poll") - before["poll"] == 2
    assert registry_requests("reconcile") == before["reconcile"]
    await operator.close()


async def test_a_status_write_planned_from_a_stale_copy_conflicts_and_is_planned_again(operator: Operator) -> None:
    await operator.created_and_ready()
    # A person labels the ModelApp; the watch has not delivered it yet, so the operator's copy is stale.
    operator.kube.edit(KIND, *APP, lambda body: body["metadata"].setdefault("labels", {}).update(team="a"))
    operator.registry.digest = D2
    writes, conflicts = operator.kube.status_writes, operator.kube.conflicts
    operator.queue.submit(APP, "webhook")
    await operator.clock.advance()
    assert operator.kube.conflicts == conflicts + 1  # the write from the stale copy
    assert operator.kube.status_writes == writes + 1  # then one write, planned from a fresh read
    body = operator.get(KIND)
    assert body["metadata"]["labels"] == {"team": "a"}  # the person's change is kept
    assert history(body) == [(2, "Progressing", D2), (1, "Ready", D1)]  # recorded once
    assert image_of(operator.get("Deployment")) == f"{REPOSITORY}@{D2}"
    assert operator.triggers == ["event", "webhook"]
    await operator.close()


async def test_a_scaled_deployment_is_put_back_through_the_queue_without_an_annotation(operator: Operator) -> None:
    await operator.created_and_ready()
    applies = len(operator.kube.applies)
    operator.kube.edit("Deployment", *APP, lambda deployment: deployment["spec"].update(replicas=5))  # kubectl scale
    await operator.watch_event("Deployment")
    await operator.clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
    assert operator.get("Deployment")["spec"]["replicas"] == 1
    assert operator.kube.applies[applies:] == [("Deployment", True)]
    assert operator.triggers == ["event", "drift"]  # the KubeClient cannot patch a ModelApp, only its status
    await operator.close()


async def test_a_rollout_past_its_deadline_is_rolled_back_through_the_queue(operator: Operator) -> None:
    await operator.created_and_ready()
    operator.registry.digest = D2  # the tag moved to an image whose pods never become ready
    operator.queue.submit(APP, "poll")
    await operator.clock.advance()
    assert image_of(operator.get("Deployment")) == f"{REPOSITORY}@{D2}"
    await operator.deployment_controller(ready=False)
    assert operator.triggers == ["event", "poll", "rollback"]
    assert image_of(operator.get("Deployment")) == f"{REPOSITORY}@{D1}"
    body = operator.get(KIND)
    assert history(body) == [(3, "Progressing", D1), (2, "Failed", D2), (1, "Ready", D1)]
    assert body["status"]["history"][0]["rollbackOf"] == 2
    await operator.deployment_controller(ready=True)
    assert ready(operator.get(KIND)) == "True" and operator.triggers == ["event", "poll", "rollback"]
    await operator.close()


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
async def test_a_deleted_child_is_recreated_through_the_queue(operator: Operator, kind: str) -> None:
    await operator.created_and_ready()
    await operator.delete(kind)
    assert operator.triggers == ["event", "recreate"]
    recreated = operator.get(kind)
    assert recreated["metadata"]["uid"] != operator.deleted["metadata"]["uid"]
    assert operator.kube.applies[-1] == (kind, False)  # created without force: never taking someone else's
    await operator.close()


async def test_a_deleted_modelapp_is_forgotten_everywhere(operator: Operator) -> None:
    await operator.created_and_ready()
    state = operator.deps.state
    assert state.modelapps.get(APP) is not None
    await operator.delete(KIND)
    assert state.modelapps.get(APP) is None
    assert not state.predates_apply(APP, {"metadata": {"generation": 0}})
    assert operator.clock.timers == 0  # no retry, no recheck left behind
    await operator.close()


async def test_a_modelapp_a_reconcile_finds_gone_is_forgotten_everywhere_without_its_event() -> None:
    operator = Operator(hub=True)
    assert operator.hub is not None
    await operator.created_and_ready()
    assert operator.hub.tracked(APP)
    operator.kube.delete(KIND, *APP)  # deleted, and no DELETED event comes (a watch restarted across it)
    operator.deps.state.modelapps.forget(APP)  # no copy kept either: the reconcile GETs it and finds it gone
    operator.queue.submit(APP, "poll")
    await operator.clock.advance()
    assert operator.hub.tracked(APP) == {}  # its tag and blob are no longer polled for it
    assert operator.deps.state.modelapps.get(APP) is None and operator.clock.timers == 0
    await operator.close()
