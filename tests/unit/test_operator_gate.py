"""The release gate (spec.release.strategy Gated, plan/gate.py) through plan_reconcile: a simulated cluster
applies what each plan asks for, so a whole gate is walked step by step: the candidate beside the stable
pair, a rejection that keeps the stable pair and is not retried, a pass that switches the Service in one
selector change and then rolls the stable Deployment, a person's promote and abort, a time-out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from modelapp_operator.api.modelapp_types import SpecError, parse_modelapp
from modelapp_operator.names import ANNOTATION_GATE_ACTION, ANNOTATION_GATE_ACTION_BY, ConditionType, Outcome, Reason
from modelapp_operator.plan.gate import SETTLE_SECONDS, GateFigures, current_gate_rejections, gate_action, pair_label
from modelapp_operator.plan.reconcile_plan import ReconcileInputs, Resolution, plan_reconcile
from modelapp_operator.plan.release import ResolvedImage, ResolvedModel, pair_of
from modelapp_operator.plan.release_gate import CheckResult, CheckState, ShadowFigures
from modelapp_operator.plan.status import Condition

pytestmark = pytest.mark.unit

START = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SHA = "b" * 64
OK_IMAGE = Resolution(Condition(ConditionType.IMAGE_RESOLVED, "True", Reason.RESOLVED, "resolved"))
OK_MODEL = Resolution(Condition(ConditionType.MODEL_RESOLVED, "True", Reason.RESOLVED, "resolved"))
CANDIDATE_IP = "10.96.0.50"


def image(n: int) -> ResolvedImage:
    return ResolvedImage(repository="127.0.0.1:5000/team/iris", digest="sha256:" + str(n) * 64, tag="1.0")


def model(version: str) -> ResolvedModel:
    return ResolvedModel(
        url="http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx", version=f'"{version}"', sha256=SHA,
        format="onnx",
    )  # fmt: skip


def release_spec(**overrides: Any) -> dict[str, Any]:
    return {"strategy": "Gated", "shadow": {"minAgreement": 0.9, "minSamples": 50}, "drainSeconds": 10, **overrides}


@dataclass
class Cluster:
    """What the API server holds: the ModelApp's status and annotations, and its children by (kind, name)."""

    release: dict[str, Any] = field(default_factory=release_spec)
    status: dict[str, Any] = field(default_factory=dict)
    generation: int = 1
    annotations: dict[str, str] = field(default_factory=dict)
    children: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    now: datetime = START

    def app_body(self) -> dict[str, Any]:
        return {
            "metadata": {
                "name": "iris", "namespace": "ml", "uid": "u1", "generation": self.generation,
                "annotations": self.annotations,
            },
            "spec": {
                "image": {"repository": "127.0.0.1:5000/team/iris", "tag": "1.0"},
                "model": {
                    "blob": {"accountUrl": "http://127.0.0.1:10000/devstoreaccount1", "container": "models",
                             "name": "iris.onnx"},
                    "credentials": {"secretRef": {"name": "storage"}},
                },
                "replicas": 2,
                "release": self.release,
            },
            "status": self.status,
        }  # fmt: skip

    def reconcile(self, pair: tuple[int, str], figures: GateFigures | None = None, *, seconds: float = 2.0) -> Any:
        """One reconcile wanting `pair` (image n, model version), `seconds` after the previous."""
        self.now += timedelta(seconds=seconds)
        app = parse_modelapp(self.app_body())
        plan = plan_reconcile(
            ReconcileInputs(
                app, image(pair[0]), OK_IMAGE, model(pair[1]), OK_MODEL,
                self.children.get(("Deployment", "iris")), self.children.get(("Service", "iris")),
                candidate_deployment=self.children.get(("Deployment", "iris-candidate")),
                candidate_service=self.children.get(("Service", "iris-candidate")),
                gate_figures=figures or GateFigures(), gate_action=gate_action(app),
            ),
            self.now,
        )  # fmt: skip
        applied = None
        for obj in plan.apply:
            live = {**obj, "metadata": {**obj["metadata"], "generation": 1}}
            if obj["kind"] == "Service":
                live["spec"] = {
                    **obj["spec"],
                    "clusterIP": CANDIDATE_IP if "candidate" in obj["metadata"]["name"] else "10.96.0.9",
                }
            self.children[(obj["kind"], obj["metadata"]["name"])] = live
            if (obj["kind"], obj["metadata"]["name"]) == ("Deployment", "iris"):
                applied = live
        self.status = plan.status_update(applied).status
        return plan

    def ready(self, name: str) -> None:
        """The Deployment's controller rolled it out: every replica ready."""
        deployment = self.children[("Deployment", name)]
        n = deployment["spec"]["replicas"]
        deployment["status"] = {"observedGeneration": 1, "replicas": n, "readyReplicas": n, "updatedReplicas": n,
                                "availableReplicas": n}  # fmt: skip

    def pair_of(self, name: str) -> tuple[str, str] | None:
        deployment = self.children.get(("Deployment", name))
        if deployment is None:
            return None
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        return annotations["modelapp.io/image-digest"][-1], annotations["modelapp.io/model-version"].strip('"')

    def candidate_pods(self) -> int:
        """Replicas of the candidate Deployment (none: 0). A decided candidate is scaled to zero, never deleted."""
        return int((self.children.get(("Deployment", "iris-candidate")) or {}).get("spec", {}).get("replicas") or 0)

    def serving(self) -> str:
        return str(self.children[("Service", "iris")]["spec"]["selector"]["app.kubernetes.io/instance"])

    @property
    def gate(self) -> dict[str, Any]:
        return dict(self.status.get("gate") or {})


def running(cluster: Cluster, pair: tuple[int, str] = (1, "v1")) -> Cluster:
    """A Gated ModelApp whose first pair rolled out (nothing to gate against the first time)."""
    plan = cluster.reconcile(pair)
    if "shadow" in cluster.release:
        assert plan.applied_kinds == ("Service", "Service")  # the stable pods wait for the candidate's address
        assert plan.gate is not None and plan.gate.recheck_after == 0.5
        plan = cluster.reconcile(pair)
        assert plan.applied_kinds == ("Deployment",)  # created with the address: never rolled to add it
    else:
        assert plan.applied_kinds == ("Service", "Service", "Deployment")
    cluster.ready("iris")
    cluster.reconcile(pair)
    assert cluster.gate == {} and cluster.serving() == "iris"
    return cluster


def settle(cluster: Cluster, pair: tuple[int, str]) -> None:
    """The candidate is Ready: shadow counts are judged from SETTLE_SECONDS later (the baseline)."""
    cluster.reconcile(pair, GateFigures(shadow=ShadowFigures()), seconds=0)
    cluster.reconcile(pair, GateFigures(shadow=ShadowFigures()), seconds=SETTLE_SECONDS + 1)
    assert cluster.gate["phase"] == "Testing" and cluster.gate["baseline"]["agreed"] == 0


def agreeing(n: int) -> GateFigures:
    return GateFigures(shadow=ShadowFigures(agreed=n))


def test_a_new_pair_runs_as_a_candidate_and_users_stay_on_the_stable_pair() -> None:
    cluster = running(Cluster())
    env = {
        e["name"]: e.get("value")
        for e in cluster.children[("Deployment", "iris")]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MODELAPP_SHADOW_URL"] == f"http://{CANDIDATE_IP}:8080" and env["MODELAPP_SHADOW_PERCENT"] == "100"
    plan = cluster.reconcile((2, "v1"))
    assert cluster.pair_of("iris") == ("1", "v1") and cluster.pair_of("iris-candidate") == ("2", "v1")
    assert cluster.serving() == "iris"
    assert cluster.gate["phase"] == "Testing" and cluster.gate["candidate"]["imageDigest"].endswith("2")
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", Reason.GATE_STARTED)]
    assert plan.gate is not None and plan.gate.recheck_after == 2.0
    candidate = cluster.children[("Deployment", "iris-candidate")]
    assert candidate["spec"]["replicas"] == 2
    assert candidate["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "iris-candidate"
    assert "MODELAPP_SHADOW_URL" not in str(candidate["spec"]["template"]["spec"]["containers"][0]["env"])
    assert cluster.status["image"]["digest"].endswith("1")  # status.image: what users are answered by
    conditions = {c["type"]: c for c in cluster.status["conditions"]}
    assert conditions["Ready"]["status"] == "True"


def test_a_candidate_that_disagrees_is_rejected_with_its_figure_and_not_tried_again() -> None:
    cluster = running(Cluster())
    cluster.reconcile((2, "v2"))
    cluster.ready("iris-candidate")
    settle(cluster, (2, "v2"))
    cluster.reconcile((2, "v2"), GateFigures(shadow=ShadowFigures(agreed=10)))
    assert cluster.gate["phase"] == "Testing" and "10 of 50 samples" in cluster.gate["message"]
    plan = cluster.reconcile((2, "v2"), GateFigures(shadow=ShadowFigures(agreed=12, disagreed=48)))
    assert cluster.gate["phase"] == "Rejected"
    assert cluster.gate["message"] == "shadow: agreement 0.20 < 0.90 over 60 samples"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", Reason.GATE_REJECTED)]
    assert "agreement 0.20 < 0.90 over 60 samples" in plan.events[0].message
    assert plan.gate is not None and plan.gate.result == "rejected"
    assert cluster.candidate_pods() == 0 and cluster.pair_of("iris") == ("1", "v1")
    assert cluster.serving() == "iris"
    head = cluster.status["history"][0]
    assert head["outcome"] == Outcome.REJECTED and head["reason"] == Reason.GATE_REJECTED
    assert head["failure"] == "shadow: agreement 0.20 < 0.90 over 60 samples"
    assert cluster.status["failedPairs"][0]["reason"] == Reason.GATE_REJECTED
    # The same pair again (a poll, a webhook): no candidate, no event, the stable pair keeps serving.
    plan = cluster.reconcile((2, "v2"))
    assert plan.events == () and cluster.candidate_pods() == 0
    assert cluster.gate["phase"] == "Rejected" and plan.gate is not None and plan.gate.recheck_after is None
    assert {c["type"]: c["status"] for c in cluster.status["conditions"]}["Ready"] == "True"
    # A changed spec tries it again.
    cluster.generation = 2
    cluster.reconcile((2, "v2"))
    assert cluster.gate["phase"] == "Testing" and cluster.pair_of("iris-candidate") == ("2", "v2")


def test_a_passing_candidate_takes_every_user_in_one_switch_then_the_stable_deployment_follows() -> None:
    cluster = running(Cluster())
    cluster.reconcile((2, "v1"))
    cluster.ready("iris-candidate")
    settle(cluster, (2, "v1"))
    plan = cluster.reconcile((2, "v1"), agreeing(60))
    assert cluster.gate["phase"] == "Promoting" and cluster.serving() == "iris-candidate"
    assert [(e.reason) for e in plan.events] == [Reason.GATE_PASSED]
    assert "agreement 1.00 >= 0.90 over 60 samples" in plan.events[0].message
    assert cluster.pair_of("iris") == ("1", "v1")  # the old stable pods drain first
    cluster.reconcile((2, "v1"), seconds=5)
    assert cluster.pair_of("iris") == ("1", "v1") and cluster.serving() == "iris-candidate"
    cluster.reconcile((2, "v1"), seconds=6)  # past drainSeconds: the stable Deployment rolls, serving nothing
    assert cluster.pair_of("iris") == ("2", "v1") and cluster.serving() == "iris-candidate"
    assert cluster.status["history"][0]["imageDigest"].endswith("2")
    cluster.reconcile((2, "v1"))
    assert cluster.serving() == "iris-candidate"  # not Ready on the new pair yet
    cluster.ready("iris")
    plan = cluster.reconcile((2, "v1"))
    assert cluster.serving() == "iris" and cluster.candidate_pods() == 0
    assert cluster.gate["phase"] == "Promoted" and [e.reason for e in plan.events] == [Reason.GATE_PROMOTED]
    assert plan.gate is not None and plan.gate.recheck_after is None
    assert ("Service", "iris-candidate") in cluster.children  # its address stays the stable pods' shadow target


def test_a_candidate_that_never_gets_enough_samples_is_rejected_at_the_deadline() -> None:
    cluster = running(Cluster(release=release_spec(timeoutSeconds=60)))
    cluster.reconcile((2, "v1"))
    cluster.ready("iris-candidate")
    settle(cluster, (2, "v1"))
    cluster.reconcile((2, "v1"), agreeing(3), seconds=30)
    assert cluster.gate["phase"] == "Testing"
    cluster.reconcile((2, "v1"), agreeing(7), seconds=31)
    assert cluster.gate["phase"] == "Rejected"
    assert cluster.gate["message"] == "timed out after 67 s: shadow: 7 of 50 samples compared"


def test_manual_promotion_waits_for_a_person_and_records_who() -> None:
    cluster = running(Cluster(release=release_spec(promotion="Manual")))
    cluster.reconcile((2, "v1"))
    cluster.ready("iris-candidate")
    settle(cluster, (2, "v1"))
    plan = cluster.reconcile((2, "v1"), agreeing(60))
    assert cluster.gate["phase"] == "AwaitingPromotion" and cluster.serving() == "iris"
    assert plan.gate is not None and plan.gate.result == "passed"
    cluster.reconcile((2, "v1"), seconds=600)
    assert cluster.gate["phase"] == "AwaitingPromotion"  # no deadline while a person decides
    candidate = pair_label(pair_of("sha256:" + "2" * 64, '"v1"'))
    cluster.annotations = {ANNOTATION_GATE_ACTION: f"promote {candidate}", ANNOTATION_GATE_ACTION_BY: "alice"}
    cluster.reconcile((2, "v1"))
    assert cluster.gate["phase"] == "Promoting" and cluster.gate["decidedBy"] == "alice"
    assert cluster.serving() == "iris-candidate"


def test_abort_rejects_the_candidate_it_names_only() -> None:
    cluster = running(Cluster())
    cluster.reconcile((2, "v1"))
    older = pair_label(pair_of("sha256:" + "9" * 64, '"v1"'))
    cluster.annotations = {ANNOTATION_GATE_ACTION: f"abort {older}", ANNOTATION_GATE_ACTION_BY: "bob"}
    cluster.reconcile((2, "v1"))
    assert cluster.gate["phase"] == "Testing"  # meant for another candidate
    candidate = pair_label(pair_of("sha256:" + "2" * 64, '"v1"'))
    cluster.annotations = {ANNOTATION_GATE_ACTION: f"abort {candidate}", ANNOTATION_GATE_ACTION_BY: "bob"}
    plan = cluster.reconcile((2, "v1"))
    assert cluster.gate["phase"] == "Rejected" and cluster.gate["message"] == "aborted by bob"
    assert plan.gate is not None and plan.gate.result == "aborted"
    assert cluster.candidate_pods() == 0


def test_a_newer_change_during_a_gate_replaces_the_candidate() -> None:
    cluster = running(Cluster())
    cluster.reconcile((2, "v1"))
    cluster.ready("iris-candidate")
    settle(cluster, (2, "v1"))
    cluster.reconcile((2, "v1"), agreeing(20))
    plan = cluster.reconcile((3, "v1"))
    assert cluster.pair_of("iris-candidate") == ("3", "v1") and cluster.gate["phase"] == "Testing"
    assert "replaces candidate" in plan.events[0].message
    assert cluster.gate["checks"] == [
        {"name": "shadow", "state": "pending", "message": "waiting for the candidate to be Ready"}
    ]


def test_a_test_set_verdict_is_kept_once_decided() -> None:
    cluster = running(Cluster(release={"strategy": "Gated", "testSet": {"blob": "iris-test.json", "minAccuracy": 0.9}}))
    cluster.reconcile((2, "v1"))
    cluster.ready("iris-candidate")
    settle(cluster, (2, "v1"))
    failed = CheckResult("testSet", CheckState.FAILED, "accuracy 0.33 < 0.90 over 3 rows")
    cluster.reconcile((2, "v1"), GateFigures(test_set=failed))
    assert (
        cluster.gate["phase"] == "Rejected" and cluster.gate["message"] == "testSet: accuracy 0.33 < 0.90 over 3 rows"
    )


def test_rolling_is_unchanged_and_leaves_no_candidate() -> None:
    cluster = Cluster(release={})
    cluster.reconcile((1, "v1"))
    cluster.ready("iris")
    cluster.reconcile((2, "v1"))
    assert cluster.pair_of("iris") == ("2", "v1") and ("Service", "iris-candidate") not in cluster.children
    assert "gate" not in cluster.status


def test_switching_back_to_rolling_scales_the_candidate_to_zero() -> None:
    cluster = running(Cluster())
    cluster.reconcile((2, "v1"))
    cluster.release = {}
    cluster.generation = 2
    cluster.reconcile((2, "v1"))
    assert cluster.candidate_pods() == 0
    assert ("Service", "iris-candidate") in cluster.children  # kept: it goes with the ModelApp
    assert cluster.pair_of("iris") == ("2", "v1")


def test_gate_rejections_of_an_older_spec_are_forgiven() -> None:
    failed: list[dict[str, Any]] = [
        {"imageDigest": "a", "modelVersion": "1", "reason": Reason.GATE_REJECTED, "generation": 3},
        {"imageDigest": "b", "modelVersion": "1", "reason": Reason.GATE_REJECTED, "generation": 4},
        {"imageDigest": "c", "modelVersion": "1"},  # a rollout's own failure: until the pair changes
    ]
    assert [p["imageDigest"] for p in current_gate_rejections(failed, 4)] == ["b", "c"]


@pytest.mark.parametrize(
    ("release", "field"),
    [
        ({"strategy": "Gated"}, "release"),
        ({"strategy": "Gated", "testSet": {"blob": "t.json"}, "health": {}}, "release"),
        ({"strategy": "Gated", "testSet": {"blob": "t.json", "minAccuracy": 0.9, "maxError": 1}}, "release.testSet"),
        ({"strategy": "Gated", "shadow": {"minAgreement": 2}}, "release.shadow.minAgreement"),
    ],
)
def test_an_invalid_release_names_its_field(release: dict[str, Any], field: str) -> None:
    body = Cluster(release=release).app_body()
    with pytest.raises(SpecError) as raised:
        parse_modelapp(body)
    assert raised.value.field.startswith(f"spec.{field}")


def test_someone_elses_object_under_the_candidates_name_blocks_the_gate() -> None:
    cluster = running(Cluster())
    cluster.children[("Deployment", "iris-candidate")] = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "iris-candidate", "namespace": "ml", "ownerReferences": []}, "spec": {},
    }  # fmt: skip
    plan = cluster.reconcile((2, "v1"))
    assert plan.apply == ()
    ready = {c["type"]: c for c in cluster.status["conditions"]}["Ready"]
    assert ready["reason"] == Reason.NAME_CONFLICT and "Deployment ml/iris-candidate exists" in ready["message"]


def test_the_candidates_pinned_version_is_reused_and_kept() -> None:
    """A candidate runs a snapshot before it has a history entry: the next reconcile must pin the same one (a new
    snapshot each tick rolled the candidate's pods every 2 s), and the snapshot is not pruned while shown."""
    from modelapp_operator.plan.history import kept_snapshots, known_pin

    url = "http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx"
    candidate = {"imageDigest": "sha256:" + "2" * 64, "modelVersion": '"v2"', "modelUrl": url,
                 "modelSnapshot": "2026-12-03T10:00:00Z"}  # fmt: skip
    status = {"gate": {"phase": "Testing", "candidate": candidate}}
    pin = known_pin(status, url, '"v2"')
    assert pin is not None and pin.snapshot == "2026-12-03T10:00:00Z"
    assert kept_snapshots(status) == {"2026-12-03T10:00:00Z"}


def test_answers_from_before_the_candidate_was_ready_do_not_count() -> None:
    """The candidate's pods start one by one: requests shadowed to a starting pod time out up to 2 s later. The
    gate judges what is counted from SETTLE_SECONDS after the whole candidate is Ready."""
    cluster = running(Cluster(release=release_spec(health={"maxErrorRate": 0.05, "minRequests": 50})))
    cluster.reconcile((2, "v1"))
    cluster.ready("iris-candidate")
    cluster.reconcile((2, "v1"), GateFigures(shadow=ShadowFigures(agreed=20, timeouts=10)))
    cluster.reconcile((2, "v1"), GateFigures(shadow=ShadowFigures(agreed=25, timeouts=30)), seconds=2)
    assert cluster.gate["phase"] == "Testing" and cluster.gate["baseline"]["timeouts"] == 30
    cluster.reconcile((2, "v1"), GateFigures(shadow=ShadowFigures(agreed=85, timeouts=31)), seconds=4)
    assert cluster.gate["phase"] == "Promoting", cluster.gate
    assert cluster.gate["verdict"] == (
        "shadow: agreement 1.00 >= 0.90 over 60 samples; health: error rate 0.016, p99 n/a over 61 requests"
    )


def test_a_status_refresh_from_a_deployment_event_keeps_the_gate() -> None:
    """A refresh (the stable Deployment's rollout moving) decides nothing about the gate: dropping status.gate there
    ended a promotion half way on real pods (the Service switched back before the stable pods were on the new pair)."""
    from modelapp_operator.plan.reconcile_plan import plan_refresh

    cluster = running(Cluster())
    cluster.reconcile((2, "v1"))
    cluster.ready("iris-candidate")
    settle(cluster, (2, "v1"))
    cluster.reconcile((2, "v1"), agreeing(60))
    assert cluster.gate["phase"] == "Promoting"
    app = parse_modelapp(cluster.app_body())
    refresh = plan_refresh(app, cluster.status, cluster.children[("Deployment", "iris")], cluster.now)
    assert refresh is not None and refresh.update is not None
    assert refresh.update.status["gate"]["phase"] == "Promoting"
