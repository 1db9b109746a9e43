"""Revision history and automatic rollback: the pure decision in build.py (plan_rollout and friends)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from modelapp_operator.api.modelapp_types import ModelApp, parse_modelapp
from modelapp_operator.plan.children import build_deployment
from modelapp_operator.plan.history import (
    FAILED_PAIRS_LIMIT,
    HISTORY_LIMIT,
    choose_release,
    deployed_pair,
    judge_history,
    plan_rollout,
    record_release,
    rolled_back_condition,
)
from modelapp_operator.plan.release import Release, ResolvedImage, ResolvedModel, release_pair
from modelapp_operator.plan.status import (
    Condition,
    Observation,
    build_status,
    derive_conditions,
    rollout_state,
    transition_events,
)

pytestmark = pytest.mark.unit

REPOSITORY = "127.0.0.1:5000/team/iris"
MODEL_URL = "http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx"
T0 = datetime(2026, 1, 2, 3, 0, 0, tzinfo=UTC)


def digest(n: int) -> str:
    return "sha256:" + f"{n:02x}" * 32


def make_app(**rollout: Any) -> ModelApp:
    return parse_modelapp(
        {
            "metadata": {"name": "iris", "namespace": "ml", "uid": "u1", "generation": 1},
            "spec": {
                "image": {"repository": REPOSITORY, "tag": "stable"},
                "model": {
                    "blob": {
                        "accountUrl": "http://127.0.0.1:10000/devstoreaccount1",
                        "container": "models",
                        "name": "iris.onnx",
                    },
                    "credentials": {"secretRef": {"name": "storage"}},
                },
                "replicas": 2,
                "rollout": {"progressDeadlineSeconds": 10, **rollout},
            },
        }
    )


def release(image: int, model: int = 1) -> Release:
    return Release(
        image=ResolvedImage(repository=REPOSITORY, digest=digest(image), tag="stable"),
        model=ResolvedModel(url=MODEL_URL, version=f'"0x8D{model:04d}"', sha256=f"{model:x}" * 64, format="onnx"),
    )


def deployment(app: ModelApp, running: Release, *, complete: bool = False, deadline: bool = False) -> dict[str, Any]:
    """The child Deployment as the API returns it once its controller has judged the template."""
    obj = build_deployment(app, running)
    obj["metadata"]["generation"] = 3
    replicas = app.spec.replicas
    conditions = []
    if deadline:
        conditions.append({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"})
    elif complete:
        conditions.append({"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"})
    obj["status"] = {
        "observedGeneration": 3,
        "replicas": replicas + (0 if complete else 1),
        "updatedReplicas": replicas if complete else 1,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": conditions,
    }
    return obj


class Operator:
    """Drives plan_rollout/build_status like reconcile does, with a clock, keeping only the status."""

    def __init__(self, app: ModelApp) -> None:
        self.app = app
        self.status: dict[str, Any] = {}
        self.now = T0
        self.running: Release | None = None  # the pair in the Deployment's pod template

    def reconcile(
        self, resolved: Release | None, live: Mapping[str, Any] | None = None, *, app: ModelApp | None = None
    ) -> Any:
        app = app or self.app
        self.now += timedelta(seconds=5)
        plan = plan_rollout(
            app.spec,
            resolved.image if resolved else None,
            resolved.model if resolved else None,
            self.status,
            live,
            self.now,
        )
        if plan.release is not None and release_pair(plan.release) != deployed_pair(live):
            live = {**build_deployment(app, plan.release), "status": {}}  # just applied: not judged yet
        if plan.release is not None:
            self.running = plan.release
        obs = Observation(
            generation=1,
            desired_replicas=app.spec.replicas,
            image=Condition("ImageResolved", "True", "Resolved", ""),
            model=Condition("ModelResolved", "True", "Resolved", ""),
            release=plan.release,
            rollout=rollout_state(live, app.spec.replicas),
            history=plan.history,
            failed_pairs=plan.failed_pairs,
            rolled_back=rolled_back_condition(plan.history, app.spec.rollout.progress_deadline_seconds),
        )
        self.status = build_status(self.status, obs, self.now)
        return plan

    def live(self, **state: bool) -> dict[str, Any]:
        assert self.running is not None
        return deployment(self.app, self.running, **state)

    def outcomes(self) -> list[tuple[int, str, str]]:
        return [(e["revision"], e["outcome"], e["reason"]) for e in self.status.get("history", [])]

    def condition(self, type_: str) -> tuple[str, str]:
        found = {c["type"]: (c["status"], c["reason"]) for c in self.status["conditions"]}
        return found[type_]


def test_first_rollout_is_revision_1_then_ready() -> None:
    op = Operator(make_app())
    op.reconcile(release(1))
    entry = op.status["history"][0]
    assert entry["revision"] == 1 and entry["outcome"] == "Progressing" and entry["reason"] == "Initial"
    assert entry["imageDigest"] == digest(1) and entry["modelVersion"] == '"0x8D0001"'
    assert entry["modelSha256"] == "1" * 64 and entry["startedAt"] == "2026-01-02T03:00:05Z"
    assert "finishedAt" not in entry
    op.reconcile(release(1), op.live(complete=True))
    assert op.outcomes() == [(1, "Ready", "RolloutComplete")]
    assert op.status["history"][0]["finishedAt"] == "2026-01-02T03:00:10Z"
    assert op.condition("Ready") == ("True", "Available") and op.condition("Degraded") == ("False", "AsExpected")
    # Nothing changes: nothing is added.
    before = op.status["history"]
    op.reconcile(release(1), op.live(complete=True))
    assert op.status["history"] == before


def test_reasons_say_what_changed_and_a_new_pair_supersedes_one_still_rolling() -> None:
    op = Operator(make_app())
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(complete=True))
    op.reconcile(release(2), op.live(complete=True))
    op.reconcile(release(2, model=2), op.live())  # rev 2 still rolling: superseded by rev 3
    assert op.outcomes() == [
        (3, "Progressing", "ModelChanged"),
        (2, "Superseded", "SupersededByRevision3"),
        (1, "Ready", "RolloutComplete"),
    ]
    op.reconcile(release(3, model=3), op.live())
    assert op.outcomes()[0] == (4, "Progressing", "ImageAndModelChanged")
    assert op.outcomes()[1][1] == "Superseded"


def test_missed_deadline_rolls_back_to_the_newest_ready_pair() -> None:
    op = Operator(make_app())
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(complete=True))
    op.reconcile(release(2), op.live(complete=True))  # the tag moved to a bad image
    assert op.running == release(2)

    plan = op.reconcile(release(2), op.live(deadline=True))
    assert plan.rollback is not None and plan.rollback.failed["revision"] == 2
    assert plan.release is not None and release_pair(plan.release) == release_pair(release(1))
    assert op.running is not None and op.running.image.digest == digest(1)
    assert op.outcomes() == [
        (3, "Progressing", "RolledBack"),
        (2, "Failed", "ProgressDeadlineExceeded"),
        (1, "Ready", "RolloutComplete"),
    ]
    assert op.status["history"][0]["rollbackOf"] == 2
    assert op.status["failedPairs"] == [
        {"imageDigest": digest(2), "modelVersion": '"0x8D0001"', "revision": 2, "failedAt": "2026-01-02T03:00:20Z"}
    ]
    assert op.status["image"]["digest"] == digest(1) and op.status["image"]["tag"] == "stable"
    degraded = next(c for c in op.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolledBack")
    assert digest(2)[7:19] in degraded["message"] and digest(1)[7:19] in degraded["message"]
    assert "revision 2" in degraded["message"] and "revision 3" in degraded["message"]

    # The restored pair becomes ready: Ready=True, still Degraded (RolledBack).
    op.reconcile(release(2), op.live(complete=True))
    assert op.outcomes()[0] == (3, "Ready", "RolloutComplete")
    assert op.condition("Ready") == ("True", "Available")
    assert op.condition("Degraded") == ("True", "RolledBack")

    # The tag still names the failed image: the failed pair is not tried again, poll after poll.
    for _ in range(3):
        plan = op.reconcile(release(2), op.live(complete=True))
        assert plan.release == op.running and op.running.image.digest == digest(1)
        assert plan.rollback is None and len(op.status["history"]) == 3

    # The image moves again: that new pair is tried; once it is Ready, Degraded clears.
    op.reconcile(release(4), op.live(complete=True))
    assert op.outcomes()[0] == (4, "Progressing", "ImageChanged")
    assert op.condition("Degraded") == ("True", "RolledBack")  # until the new pair is Ready
    op.reconcile(release(4), op.live(complete=True))
    assert op.outcomes()[0] == (4, "Ready", "RolloutComplete")
    assert op.condition("Degraded") == ("False", "AsExpected")
    assert op.status["failedPairs"][0]["imageDigest"] == digest(2)  # still remembered


def test_a_new_model_with_the_failed_image_is_a_new_pair() -> None:
    op = Operator(make_app())
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(complete=True))
    op.reconcile(release(2), op.live(complete=True))
    op.reconcile(release(2), op.live(deadline=True))
    plan = op.reconcile(release(2, model=2), op.live(complete=True))
    assert plan.release == release(2, model=2)
    assert op.outcomes()[0] == (4, "Progressing", "ImageAndModelChanged")


def test_without_auto_rollback_the_failed_pair_keeps_running_degraded() -> None:
    op = Operator(make_app(autoRollback=False))
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(complete=True))
    op.reconcile(release(2), op.live(complete=True))
    plan = op.reconcile(release(2), op.live(deadline=True))
    assert plan.rollback is None and plan.release == release(2)
    assert op.outcomes()[:2] == [(2, "Failed", "ProgressDeadlineExceeded"), (1, "Ready", "RolloutComplete")]
    assert op.status["failedPairs"] == []
    assert op.condition("Degraded") == ("True", "ProgressDeadlineExceeded")
    assert op.condition("Ready") == ("False", "ProgressDeadlineExceeded")
    # Polls change nothing.
    op.reconcile(release(2), op.live(deadline=True))
    assert len(op.status["history"]) == 2
    # Setting the spec back by hand (the old digest) rolls to it as a new revision.
    plan = op.reconcile(release(1), op.live(deadline=True))
    assert plan.release == release(1) and op.outcomes()[0] == (3, "Progressing", "ImageChanged")
    assert op.outcomes()[1] == (2, "Failed", "ProgressDeadlineExceeded")  # a Failed entry stays Failed
    op.reconcile(release(1), op.live(complete=True))
    assert op.condition("Degraded") == ("False", "AsExpected") and op.condition("Ready") == ("True", "Available")


def test_a_failed_pair_that_still_runs_may_recover() -> None:
    op = Operator(make_app(autoRollback=False))
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(deadline=True))
    assert op.outcomes() == [(1, "Failed", "ProgressDeadlineExceeded")]
    op.reconcile(release(1), op.live(complete=True))  # e.g. the image pull finally worked
    assert op.outcomes() == [(1, "Ready", "RolloutComplete")]


def test_no_ready_pair_to_return_to_keeps_the_failed_one_running() -> None:
    op = Operator(make_app())
    op.reconcile(release(1))
    plan = op.reconcile(release(1), op.live(deadline=True))
    assert plan.rollback is None and plan.release == release(1)
    assert op.outcomes() == [(1, "Failed", "ProgressDeadlineExceeded")]
    assert op.status["failedPairs"] == []
    assert op.condition("Degraded") == ("True", "ProgressDeadlineExceeded")


def test_a_failed_rollback_is_not_rolled_back_again() -> None:
    op = Operator(make_app())
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(complete=True))
    op.reconcile(release(2), op.live(complete=True))
    op.reconcile(release(3), op.live(complete=True))  # supersedes 2
    op.reconcile(release(3), op.live(complete=True))  # 3 Ready
    op.reconcile(release(4), op.live(complete=True))
    op.reconcile(release(4), op.live(deadline=True))  # 4 fails: back to 3
    assert op.running == release(3)
    plan = op.reconcile(release(4), op.live(deadline=True))  # the restored pair fails too (cluster trouble)
    assert plan.rollback is None and op.running == release(3)
    assert op.outcomes()[:2] == [(5, "Failed", "ProgressDeadlineExceeded"), (4, "Failed", "ProgressDeadlineExceeded")]
    assert [p["imageDigest"] for p in op.status["failedPairs"]] == [digest(4)]


def test_deadline_from_before_the_template_changed_counts_for_nothing() -> None:
    app = make_app()
    op = Operator(app)
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(complete=True))
    op.reconcile(release(2), op.live(complete=True))
    stale = op.live(deadline=True)
    stale["metadata"]["generation"] = 4  # applied, not yet observed by the Deployment controller
    plan = op.reconcile(release(2), stale)
    assert plan.rollback is None and op.outcomes()[0] == (2, "Progressing", "ImageChanged")
    # A Deployment that runs another pair than the newest entry says nothing about that entry.
    other = deployment(app, release(9), deadline=True)
    plan = op.reconcile(release(2), other)
    assert plan.rollback is None and op.outcomes()[0][1] == "Progressing"


def test_resolution_failure_during_a_rollback_still_restores_the_ready_pair() -> None:
    op = Operator(make_app())
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(complete=True))
    op.reconcile(release(2), op.live(complete=True))
    plan = op.reconcile(None, op.live(deadline=True))  # registry down right now
    assert plan.rollback is not None and plan.release == op.running == release(1)


def test_choose_release_skips_failed_pairs() -> None:
    app = make_app()
    status: dict[str, Any] = {
        "image": {"repository": REPOSITORY, "digest": digest(2)},
        "model": {"url": MODEL_URL, "version": '"0x8D0001"', "sha256": "1" * 64, "format": "onnx"},
        "history": [
            {"revision": 2, "imageDigest": digest(2), "modelVersion": '"0x8D0001"', "outcome": "Failed"},
            {
                "revision": 1,
                "imageDigest": digest(1),
                "modelVersion": "0x8D0001",  # ETags compare without quotes
                "modelSha256": "1" * 64,
                "outcome": "Ready",
                "imageRepository": REPOSITORY,
                "modelUrl": MODEL_URL,
                "modelFormat": "onnx",
            },
        ],
        "failedPairs": [{"imageDigest": digest(2), "modelVersion": "0x8D0001"}],
    }
    bad = release(2)
    chosen = choose_release(app.spec, bad.image, bad.model, status)
    assert chosen is not None and chosen.image.digest == digest(1) and chosen.model.sha256 == "1" * 64
    assert choose_release(app.spec, None, None, status) == chosen
    assert choose_release(app.spec, release(3).image, bad.model, status) == release(3)
    # Without a Ready entry to fall back on, what runs keeps running.
    no_ready = {**status, "history": status["history"][:1]}
    assert choose_release(app.spec, bad.image, bad.model, no_ready) == Release(
        image=ResolvedImage(REPOSITORY, digest(2)), model=bad.model
    )


def test_history_and_failed_pairs_are_bounded() -> None:
    op = Operator(make_app())
    for n in range(1, 15):
        op.reconcile(release(n))
        op.reconcile(release(n), op.live(complete=True))
    revisions = [e["revision"] for e in op.status["history"]]
    assert len(revisions) == HISTORY_LIMIT and revisions == list(range(14, 4, -1))
    failed = [{"imageDigest": digest(n), "modelVersion": "v"} for n in range(20, 20 + FAILED_PAIRS_LIMIT)]
    op.status["failedPairs"] = failed
    op.reconcile(release(30), op.live(complete=True))
    op.reconcile(release(30), op.live(deadline=True))
    assert len(op.status["failedPairs"]) == FAILED_PAIRS_LIMIT
    assert op.status["failedPairs"][0]["imageDigest"] == digest(30)


def test_record_release_and_deployed_pair() -> None:
    assert record_release([], None, T0) == []
    first = record_release([], release(1), T0)
    assert record_release(first, release(1), T0) == first
    assert deployed_pair(None) is None and deployed_pair({"spec": {}}) is None
    assert deployed_pair(build_deployment(make_app(), release(1))) == (digest(1), "0x8D0001")


def test_judge_leaves_settled_entries_alone() -> None:
    app = make_app()
    history = [{"revision": 1, "imageDigest": digest(1), "modelVersion": '"0x8D0001"', "outcome": "Ready"}]
    status = {"history": history}
    judged, failed_pairs, failed = judge_history(app.spec, status, deployment(app, release(1), deadline=True), T0)
    assert judged == history and failed_pairs == [] and failed is None


def test_rolled_back_condition_needs_no_failed_entry_in_view() -> None:
    history = [{"revision": 12, "rollbackOf": 11, "imageDigest": digest(1), "modelVersion": "v", "outcome": "Ready"}]
    condition = rolled_back_condition(history, 60)
    assert condition is not None and "revision 11" in condition.message and "60s" in condition.message
    assert rolled_back_condition([], 60) is None


def test_rollback_posts_no_transition_event_of_its_own() -> None:
    """reconcile posts one RolledBack Warning per rollback; the Degraded transition must not add a second."""
    op = Operator(make_app())
    op.reconcile(release(1))
    op.reconcile(release(1), op.live(complete=True))
    op.reconcile(release(2), op.live(complete=True))
    before = op.status
    op.reconcile(release(2), op.live(deadline=True))
    assert "RolledBack" not in [e.reason for e in transition_events(before, op.status)]


def test_deadline_of_the_running_pair_outranks_rolled_back() -> None:
    app = make_app()
    history = [{"revision": 3, "rollbackOf": 2, "outcome": "Progressing"}]
    obs = Observation(
        generation=1,
        desired_replicas=2,
        image=Condition("ImageResolved", "True", "Resolved", ""),
        model=Condition("ModelResolved", "True", "Resolved", ""),
        release=release(1),
        rollout=rollout_state(deployment(app, release(1), deadline=True), 2),
        rolled_back=rolled_back_condition(history, 10),
    )
    degraded = derive_conditions(obs)[2]
    assert (degraded.status, degraded.reason) == ("True", "ProgressDeadlineExceeded")


# --- invariants over random event sequences ------------------------------------------------------

EVENTS = st.lists(
    st.tuples(st.sampled_from(["resolve", "ready", "deadline", "outage"]), st.integers(1, 4), st.integers(1, 2)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(events=EVENTS, auto_rollback=st.booleans())
def test_history_invariants(events: list[tuple[str, int, int]], auto_rollback: bool) -> None:
    op = Operator(make_app(autoRollback=auto_rollback))
    resolved: Release | None = None
    for kind, image, model in events:
        live = op.live(complete=kind == "ready", deadline=kind == "deadline") if op.running else None
        if kind == "resolve":
            resolved = release(image, model)
        plan = op.reconcile(None if kind == "outage" else resolved, live)
        history = op.status.get("history", [])
        revisions = [e["revision"] for e in history]
        assert revisions == sorted(revisions, reverse=True) and len(set(revisions)) == len(revisions)
        assert len(history) <= HISTORY_LIMIT and len(op.status.get("failedPairs", [])) <= FAILED_PAIRS_LIMIT
        assert all(e["outcome"] != "Progressing" for e in history[1:])  # only the newest may be rolling
        failed = {(p["imageDigest"], p["modelVersion"]) for p in op.status.get("failedPairs", [])}
        if not auto_rollback:
            assert not failed
        if plan.release is not None:
            assert (plan.release.image.digest, plan.release.model.version) not in failed or plan.rollback is None
            assert history and (history[0]["imageDigest"], history[0]["modelVersion"]) == (
                plan.release.image.digest,
                plan.release.model.version,
            )
            if plan.rollback is not None:
                assert (plan.release.image.digest, plan.release.model.version) not in failed
                assert history[0]["rollbackOf"] == plan.rollback.failed["revision"]
