"""The CLI's pure parts: patches, the wait verdict, rollback targets and the status table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from modelapp_operator.cli.status import (
    RollbackError,
    Wanted,
    build_rollback_patch,
    build_set_image_patch,
    build_set_model_patch,
    choose_rollback_target,
    pin_problem,
    pin_to_check,
    render_status,
    status_summary,
    wait_verdict,
)

pytestmark = pytest.mark.unit

OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
V1, V2 = '"0x8DC000000000001"', '"0x8DC000000000002"'
SHA1, SHA2 = "1" * 64, "2" * 64
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def condition(type_: str, status: str, reason: str, generation: int = 3, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T11:58:00Z",
    }


def body(
    *,
    generation: int = 3,
    observed: int = 3,
    digest: str = NEW,
    version: str = V1,
    spec_digest: str | None = NEW,
    spec_version: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    **status: Any,
) -> dict[str, Any]:
    image: dict[str, Any] = {"repository": "127.0.0.1:5000/iris"}
    image.update({"digest": spec_digest} if spec_digest else {"tag": "stable"})
    model: dict[str, Any] = {"blob": {}}
    if spec_version:
        model["version"] = spec_version
    return {
        "metadata": {"name": "iris", "namespace": "ml", "generation": generation},
        "spec": {"image": image, "model": model},
        "status": {
            "observedGeneration": observed,
            "image": {"digest": digest, "reference": f"127.0.0.1:5000/iris@{digest}"},
            "model": {"version": version, "sha256": SHA1, "format": "onnx", "url": "http://x/models/iris.onnx"},
            "replicas": 2,
            "readyReplicas": 2,
            "updatedReplicas": 2,
            "replicaSummary": "2/2",
            "conditions": conditions
            if conditions is not None
            else [condition("Ready", "True", "Available", generation), condition("Degraded", "False", "Healthy")],
            **status,
        },
    }


def test_set_image_patch_pins_the_digest_and_drops_the_tag() -> None:
    assert build_set_image_patch(NEW) == {"spec": {"image": {"digest": NEW, "tag": None, "followTag": None}}}
    patch = build_set_image_patch(NEW, "myacr.azurecr.io/iris")
    assert patch["spec"]["image"]["repository"] == "myacr.azurecr.io/iris"


@pytest.mark.parametrize("digest", ["", "sha256:abc", "sha256:" + "A" * 64, "md5:" + "a" * 64, NEW + "\n", "latest"])
def test_set_image_refuses_a_malformed_digest(digest: str) -> None:
    with pytest.raises(ValueError, match="not a digest"):
        build_set_image_patch(digest)


def test_set_model_patch_pins_or_follows() -> None:
    assert build_set_model_patch(V2, SHA2) == {"spec": {"model": {"version": V2, "sha256": SHA2}}}
    assert build_set_model_patch(None, None) == {"spec": {"model": {"version": None, "sha256": None}}}
    with pytest.raises(ValueError, match="sha256"):
        build_set_model_patch(V2, "XYZ")
    with pytest.raises(ValueError, match="ETag"):
        build_set_model_patch("has space", None)


def test_ready_with_the_wanted_digest_is_done() -> None:
    verdict = wait_verdict(body(), Wanted(NEW, None))
    assert (verdict.state, verdict.reason) == ("ready", "Available")


def test_wanted_pair_defaults_to_what_the_spec_pins() -> None:
    assert Wanted.from_spec(body(spec_version=V2), None, None) == Wanted(NEW, V2)
    assert Wanted.from_spec(body(spec_digest=None), None, None) == Wanted(None, None)
    assert wait_verdict(body(spec_version=V2), Wanted.from_spec(body(spec_version=V2), None, None)).state == "waiting"


def test_model_versions_compare_without_quotes() -> None:
    assert wait_verdict(body(version=V1), Wanted(None, V1.strip('"'))).state == "ready"


def test_ready_but_an_older_generation_keeps_waiting() -> None:
    verdict = wait_verdict(body(generation=4, observed=3), Wanted(NEW, None))
    assert (verdict.state, verdict.reason) == ("waiting", "NotObserved")


def test_ready_with_another_digest_keeps_waiting() -> None:
    verdict = wait_verdict(body(digest=OLD), Wanted(NEW, None))
    assert verdict.state == "waiting" and "want image bbbbbbbbbbbb" in verdict.message


def test_rolling_out_keeps_waiting_with_the_reason() -> None:
    rolling = body(conditions=[condition("Ready", "False", "RollingOut", message="1/2 updated")])
    verdict = wait_verdict(rolling, Wanted(NEW, None))
    assert (verdict.state, verdict.reason, verdict.message) == ("waiting", "RollingOut", "1/2 updated")


def test_rolled_back_pair_fails_the_wait() -> None:
    rolled_back = body(
        digest=OLD,
        conditions=[
            condition("Ready", "True", "Available"),
            condition("Degraded", "True", "RolledBack", message=f"image {NEW[7:19]} model {V1} failed: rolled back"),
        ],
        failedPairs=[{"imageDigest": NEW, "modelVersion": V1}],
    )
    verdict = wait_verdict(rolled_back, Wanted(NEW, None))
    assert (verdict.state, verdict.reason) == ("failed", "RolledBack")
    assert "rolled back" in verdict.message


def test_rolled_back_message_alone_fails_the_wait() -> None:
    rolled_back = body(
        digest=OLD,
        conditions=[
            condition("Ready", "True", "Available"),
            condition("Degraded", "True", "RolledBack", message=f"rolled back from {NEW}"),
        ],
    )
    assert wait_verdict(rolled_back, Wanted(NEW, None)).state == "failed"


def test_an_earlier_rollback_of_another_pair_does_not_fail_a_new_wait() -> None:
    other = "sha256:" + "c" * 64
    earlier = body(
        digest=OLD,
        conditions=[
            condition("Ready", "False", "RollingOut"),
            condition("Degraded", "True", "RolledBack", message=f"rolled back from {other}"),
        ],
        failedPairs=[{"imageDigest": other, "modelVersion": V1}],
    )
    assert wait_verdict(earlier, Wanted(NEW, None)).state == "waiting"


def test_waiting_for_the_restored_pair_after_a_rollback_succeeds() -> None:
    message = (
        f"rollout of revision 3 (image {NEW[7:19]} model {V1}) was not ready within 30s (ProgressDeadlineExceeded); "
        f"rolled back to revision 4 (image {OLD[7:19]} model {V1})."
    )
    restored = body(
        digest=OLD,
        spec_digest=OLD,
        conditions=[
            condition("Ready", "True", "Available"),
            condition("Degraded", "True", "RolledBack", message=message),
        ],
        failedPairs=[{"imageDigest": NEW, "modelVersion": V1}],
        history=[
            {"revision": 4, "imageDigest": OLD, "modelVersion": V1, "outcome": "Ready", "rollbackOf": 3},
            {"revision": 3, "imageDigest": NEW, "modelVersion": V1, "outcome": "Failed"},
            {"revision": 2, "imageDigest": OLD, "modelVersion": V1, "outcome": "Ready"},
        ],
    )
    assert wait_verdict(restored, Wanted(OLD, None)).state == "ready"
    assert wait_verdict(restored, Wanted(NEW, None)).state == "failed"
    # Without history and failedPairs (an older operator) the message decides, by its failed part only.
    del restored["status"]["failedPairs"], restored["status"]["history"]
    assert wait_verdict(restored, Wanted(OLD, None)).state == "ready"
    assert wait_verdict(restored, Wanted(NEW, None)).state == "failed"


def test_failed_history_entry_fails_the_wait() -> None:
    failed = body(
        digest=OLD,
        conditions=[condition("Ready", "True", "Available"), condition("Degraded", "False", "Healthy")],
        history=[
            {"revision": 2, "imageDigest": NEW, "modelVersion": V1, "outcome": "Failed", "reason": "deadline"},
            {"revision": 1, "imageDigest": OLD, "modelVersion": V1, "outcome": "Ready"},
        ],
    )
    verdict = wait_verdict(failed, Wanted(NEW, None))
    assert verdict.state == "failed" and "revision 2" in verdict.message


def test_progress_deadline_of_the_running_pair_fails_the_wait() -> None:
    stuck = body(
        conditions=[
            condition("Ready", "False", "ProgressDeadlineExceeded"),
            condition("Degraded", "True", "ProgressDeadlineExceeded", message="no progress for 300s"),
        ]
    )
    verdict = wait_verdict(stuck, Wanted(NEW, None))
    assert (verdict.state, verdict.reason) == ("failed", "ProgressDeadlineExceeded")


def test_degraded_of_an_older_generation_is_not_final() -> None:
    stale = body(
        generation=4,
        observed=3,
        conditions=[
            condition("Ready", "False", "ProgressDeadlineExceeded", generation=3),
            condition("Degraded", "True", "ProgressDeadlineExceeded", generation=3),
        ],
    )
    assert wait_verdict(stale, Wanted(NEW, None)).state == "waiting"


def test_resolution_trouble_is_not_final() -> None:
    flaky = body(
        conditions=[condition("Ready", "True", "Available"), condition("Degraded", "True", "RegistryUnavailable")]
    )
    assert wait_verdict(flaky, Wanted(NEW, None)).state == "ready"


def test_invalid_spec_fails_the_wait() -> None:
    invalid = body(conditions=[condition("Ready", "False", "InvalidSpec", message="spec.port: too small")])
    verdict = wait_verdict(invalid, Wanted(None, None))
    assert (verdict.state, verdict.message) == ("failed", "spec.port: too small")


def test_no_status_yet_keeps_waiting() -> None:
    fresh = {"metadata": {"name": "iris", "namespace": "ml", "generation": 1}, "spec": {"image": {}, "model": {}}}
    assert wait_verdict(fresh, Wanted(None, None)).state == "waiting"


HISTORY = [
    {"revision": 4, "imageDigest": NEW, "modelVersion": V2, "modelSha256": SHA2, "outcome": "Failed"},
    {"revision": 3, "imageDigest": NEW, "modelVersion": V1, "modelSha256": SHA1, "outcome": "Ready"},
    {"revision": 2, "imageDigest": OLD, "modelVersion": V1, "modelSha256": SHA1, "outcome": "Ready"},
    {"revision": 1, "imageDigest": OLD, "modelVersion": V2, "modelSha256": SHA2, "outcome": "Superseded"},
]


def test_rollback_defaults_to_the_newest_other_ready_pair() -> None:
    entry = choose_rollback_target(body(history=HISTORY), None)
    assert entry["revision"] == 2
    assert build_rollback_patch(entry) == {
        "spec": {
            "image": {"digest": OLD, "tag": None, "followTag": None},
            "model": {"version": V1, "sha256": SHA1},
        }
    }


def test_rollback_to_a_named_revision() -> None:
    assert choose_rollback_target(body(history=HISTORY), 3)["revision"] == 3


@pytest.mark.parametrize(
    ("history", "revision", "message"),
    [
        ([], None, "history is empty"),
        (HISTORY, 4, "outcome Failed"),
        (HISTORY, 1, "outcome Superseded"),
        (HISTORY, 9, "no revision 9"),
        (HISTORY[1:2], None, "no earlier Ready pair"),
    ],
)
def test_rollback_refuses_what_never_served(history: list[dict[str, Any]], revision: int | None, message: str) -> None:
    with pytest.raises(RollbackError, match=message):
        choose_rollback_target(body(history=history), revision)


def test_status_table_for_people() -> None:
    text = render_status(body(history=HISTORY), NOW)
    lines = text.splitlines()
    assert lines[0] == "ModelApp ml/iris  (generation 3, observed 3)"
    assert f"127.0.0.1:5000/iris@{NEW}" in lines[1]
    assert "2/2 ready, 2 updated" in text
    assert any(line.split()[:4] == ["Ready", "True", "Available", "2m"] for line in lines)
    assert any(line.split()[:3] == ["1", "Superseded", "aaaaaaaaaaaa"] for line in lines)


def test_status_summary_for_scripts() -> None:
    summary = status_summary(body(history=HISTORY))
    assert summary["image"]["digest"] == NEW
    assert summary["replicas"] == {"desired": 2, "ready": 2, "updated": 2, "summary": "2/2"}
    assert [h["revision"] for h in summary["history"]] == [4, 3, 2, 1]


def test_status_of_an_unreconciled_app() -> None:
    fresh = {"metadata": {"name": "iris", "namespace": "ml", "generation": 1}, "spec": {}}
    text = render_status(fresh, NOW)
    assert "the operator has not reconciled" in text and "(none)" in text


URL = "http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx"
SNAP = "2026-01-01T11:00:00.1234567Z"


def test_rollback_checks_the_snapshot_the_entry_pinned() -> None:
    entry = {"revision": 1, "modelUrl": URL, "modelVersion": V1, "modelSnapshot": SNAP}
    check = pin_to_check(entry)
    assert check is not None
    assert (check.url, check.version, check.pin.snapshot, check.pin.version_id) == (URL, V1, SNAP, None)
    assert pin_problem(check, V1) is None
    assert pin_problem(check, V1.strip('"')) is None  # ETags compare without quotes
    gone = pin_problem(check, None)
    assert gone is not None and f"snapshot {SNAP}" in gone and "no longer exists" in gone


def test_rollback_checks_the_version_id_before_a_snapshot() -> None:
    entry = {
        "modelUrl": URL,
        "modelVersion": V1,
        "modelVersionId": "2026-01-01T11:00:00.0000000Z",
        "modelSnapshot": SNAP,
    }
    check = pin_to_check(entry)
    assert check is not None and check.pin.version_id and check.pin.snapshot is None
    gone = pin_problem(check, None)
    assert gone is not None and "version 2026-01-01T11:00:00.0000000Z" in gone


def test_an_unpinned_entry_needs_the_blob_still_at_its_etag() -> None:
    check = pin_to_check({"modelUrl": URL, "modelVersion": V1})
    assert check is not None and not check.pin.pinned
    assert pin_problem(check, V1) is None
    overwritten = pin_problem(check, V2)
    assert overwritten is not None and "overwritten" in overwritten and V2 in overwritten


def test_an_entry_without_a_model_url_has_nothing_to_check() -> None:
    assert pin_to_check({"revision": 1, "modelVersion": V1}) is None


def test_a_failed_pair_names_the_part_that_failed() -> None:
    failed = body(
        digest=OLD,
        conditions=[condition("Ready", "True", "Available"), condition("Degraded", "False", "Healthy")],
        history=[
            {
                "revision": 2,
                "imageDigest": NEW,
                "modelVersion": V1,
                "outcome": "Failed",
                "reason": "ImageCrashed",
                "failure": "container app exited with code 3: boom",
            }
        ],
    )
    verdict = wait_verdict(failed, Wanted(NEW, None))
    assert verdict.state == "failed"
    expected = "ImageCrashed: container app exited with code 3: boom"
    assert verdict.message == f"revision 2 (image {NEW[7:19]}) failed: {expected}"
