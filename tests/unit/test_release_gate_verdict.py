"""The release gate's verdict as pure functions: samples in, verdict out (issue 20)."""

from __future__ import annotations

import pytest
from modelapp_operator.plan.release_gate import (
    AgreementThreshold,
    CheckResult,
    CheckState,
    HealthThreshold,
    LabelledSetThreshold,
    answers_agree,
    judge_agreement,
    judge_health,
    judge_test_set,
    overall,
)

pytestmark = pytest.mark.unit


def test_labels_agree_exactly_and_numbers_within_tolerance() -> None:
    assert answers_agree([0, 2, 1], [0, 2, 1])
    assert not answers_agree([0, 2, 1], [0, 1, 1])  # the demo's second model changes one row
    assert not answers_agree("setosa", "versicolor")
    assert answers_agree(1.0, 1.05, tolerance=0.1)
    assert not answers_agree(1.0, 1.2, tolerance=0.1)
    assert not answers_agree(True, 1)  # a bool is a label, not the number 1
    assert not answers_agree([1, 2], [1, 2, 3])
    assert not answers_agree(float("nan"), float("nan"))
    assert answers_agree([[0.1, 0.9]], [[0.1, 0.9]])


def test_permuted_labels_fail_the_shadow_check_with_their_figure() -> None:
    threshold = AgreementThreshold(min_agreement=0.95, min_samples=400)
    stable = [i % 3 for i in range(400)]
    permuted = [(label + 1) % 3 if label else label for label in stable]  # labels 1 and 2 swapped round
    agreed = sum(answers_agree(s, c) for s, c in zip(stable, permuted, strict=True))
    result = judge_agreement(agreed, len(stable), threshold)
    assert result.state is CheckState.FAILED
    assert result.message == "agreement 0.34 < 0.95 over 400 samples"


def test_too_few_samples_is_pending_not_failed() -> None:
    result = judge_agreement(3, 10, AgreementThreshold(min_agreement=0.95, min_samples=200))
    assert result.state is CheckState.PENDING
    assert result.message == "10 of 200 samples compared"


def test_test_set_accuracy_and_regression_error() -> None:
    good = judge_test_set([0, 2, 1, 1], [0, 2, 1, 1], LabelledSetThreshold(min_accuracy=0.9))
    assert (good.state, good.message) == (CheckState.PASSED, "accuracy 1.00 >= 0.90 over 4 rows")
    bad = judge_test_set([0, 2, 1, 1], [0, 1, 1, 1], LabelledSetThreshold(min_accuracy=0.9))
    assert (bad.state, bad.message) == (CheckState.FAILED, "accuracy 0.75 < 0.90 over 4 rows")
    regression = judge_test_set([1.0, 2.0], [1.5, 2.5], LabelledSetThreshold(max_error=0.25))
    assert (regression.state, regression.message) == (CheckState.FAILED, "mean error 0.5 > 0.25 over 2 rows")
    assert judge_test_set([1.0], ["x"], LabelledSetThreshold(max_error=1.0)).state is CheckState.FAILED
    assert judge_test_set([1, 2], [1], LabelledSetThreshold()).message == "1 answers for 2 test rows"


def test_health_fails_on_errors_or_latency() -> None:
    threshold = HealthThreshold(max_error_rate=0.01, max_p99_ms=200, min_requests=100)
    assert judge_health(50, 0, 5.0, threshold).state is CheckState.PENDING
    failing = judge_health(200, 60, 5.0, threshold)
    assert (failing.state, failing.message) == (CheckState.FAILED, "error rate 0.300 > 0.010 over 200 requests")
    slow = judge_health(200, 0, 450.0, threshold)
    assert slow.message == "p99 450 ms > 200 ms over 200 requests"
    assert judge_health(200, 1, 12.0, threshold).state is CheckState.PASSED


def test_overall_verdict() -> None:
    passed = CheckResult("shadow", CheckState.PASSED, "agreement 1.00 >= 0.95 over 200 samples")
    pending = CheckResult("health", CheckState.PENDING, "10 of 100 requests seen")
    failed = CheckResult("testSet", CheckState.FAILED, "accuracy 0.75 < 0.90 over 4 rows")
    assert overall([passed, pending], 10, 600).state is CheckState.PENDING
    assert overall([passed, failed, pending], 10, 600).message == "testSet: accuracy 0.75 < 0.90 over 4 rows"
    timed_out = overall([passed, pending], 600, 600)
    assert (timed_out.state, timed_out.message) == (
        CheckState.FAILED,
        "timed out after 600 s: health: 10 of 100 requests seen",
    )
    assert overall([passed], 1, 600).state is CheckState.PASSED
