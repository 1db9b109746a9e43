"""The release gate's verdict as pure functions: samples in, verdict out (issue 20)."""

from __future__ import annotations

import pytest
from modelapp_contract.agreement import answers_agree
from modelapp_operator.plan.release_gate import (
    AgreementThreshold,
    CheckResult,
    CheckState,
    HealthThreshold,
    LabelledSetThreshold,
    judge_agreement,
    judge_health,
    judge_test_set,
    overall,
    shadow_figures,
)
from modelapp_serving.metrics import ServingMetrics
from prometheus_client.parser import text_string_to_metric_families

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


# --- the figures the stable pods report ---------------------------------------------------------------------

CANDIDATE = "sha256:" + "b" * 64 + "/0x2"
EARLIER = "sha256:" + "c" * 64 + "/0x1"


def _pod_metrics(outcomes: dict[tuple[str, str], int], latencies: dict[str, list[float]]) -> str:
    """One stable pod's /metrics, rendered by the app's own metrics (so the names are the app's)."""
    metrics = ServingMetrics()
    for (candidate, outcome), times in outcomes.items():
        metrics.shadow_comparisons.labels(candidate, outcome).inc(times)
    for candidate, seconds in latencies.items():
        for value in seconds:
            metrics.shadow_latency.labels(candidate).observe(value)
    return metrics.render().decode()


def _samples(*texts: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for text in texts
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def test_shadow_figures_sum_the_pods_and_ignore_an_earlier_candidate() -> None:
    pod_a = _pod_metrics(
        {(CANDIDATE, "agreed"): 150, (CANDIDATE, "disagreed"): 10, (EARLIER, "disagreed"): 500},
        {CANDIDATE: [0.004] * 160},
    )
    pod_b = _pod_metrics(
        {(CANDIDATE, "agreed"): 90, (CANDIDATE, "error"): 3, (CANDIDATE, "timeout"): 2},
        {CANDIDATE: [0.004] * 93 + [1.5] * 2},
    )
    figures = shadow_figures(_samples(pod_a, pod_b), CANDIDATE)
    assert (figures.agreed, figures.disagreed, figures.errors, figures.timeouts) == (240, 10, 3, 2)
    assert figures.compared == 250 and figures.requests == 255
    assert figures.p99_ms == 5.0  # 253 of 255 answers within the 5 ms bucket: 99.2 %
    verdict = judge_agreement(figures.agreed, figures.compared, AgreementThreshold(0.95, 200))
    assert verdict.state is CheckState.PASSED and verdict.message == "agreement 0.96 >= 0.95 over 250 samples"


def test_a_slow_tail_puts_p99_in_its_bucket_and_no_samples_mean_no_figure() -> None:
    slow = _pod_metrics({(CANDIDATE, "agreed"): 100}, {CANDIDATE: [0.004] * 97 + [0.4] * 3})
    assert shadow_figures(_samples(slow), CANDIDATE).p99_ms == 500.0
    beyond = _pod_metrics({(CANDIDATE, "agreed"): 10}, {CANDIDATE: [9.0] * 10})
    assert shadow_figures(_samples(beyond), CANDIDATE).p99_ms == float("inf")
    nothing = shadow_figures(_samples(slow), "sha256:" + "d" * 64 + "/0x9")
    assert nothing.requests == 0 and nothing.p99_ms is None
    health = judge_health(nothing.requests, 0, nothing.p99_ms, HealthThreshold(0.01, 250, 50))
    assert health.state is CheckState.PENDING
