"""The release gate's verdict: is a candidate pair good enough to take user traffic? (issue 20)

Pure: figures in, verdict out. What the candidate answered (on a test set, or on shadowed live
requests beside the stable pair) is collected elsewhere; this module only compares answers and
applies the thresholds a ModelApp's gate names. Every failed check says why with its measured
figure ("agreement 0.31 < 0.95 over 400 samples"), because that sentence is what status, the
Warning event and `modelapp status` show to the people who must decide what to do next.

A check that has not seen enough samples yet is `pending`, not failed: a quiet hour must not
reject a good model. Only the gate's own deadline turns pending into failed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from modelapp_contract.agreement import Prediction, answers_agree


class CheckState(StrEnum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class CheckResult:
    name: str  # testSet, shadow, health
    state: CheckState
    message: str  # the figure and the threshold, or what is still missing


@dataclass(frozen=True)
class AgreementThreshold:
    min_agreement: float  # share of samples whose answers agree, 0..1
    min_samples: int
    tolerance: float = 0.0


def judge_agreement(agreed: int, compared: int, threshold: AgreementThreshold) -> CheckResult:
    """Shadow traffic: the candidate's answers against the stable pair's on the same inputs."""
    if compared < threshold.min_samples:
        return CheckResult("shadow", CheckState.PENDING, f"{compared} of {threshold.min_samples} samples compared")
    share = agreed / compared
    if share < threshold.min_agreement:
        return CheckResult(
            "shadow",
            CheckState.FAILED,
            f"agreement {share:.2f} < {threshold.min_agreement:.2f} over {compared} samples",
        )
    return CheckResult(
        "shadow", CheckState.PASSED, f"agreement {share:.2f} >= {threshold.min_agreement:.2f} over {compared} samples"
    )


@dataclass(frozen=True)
class LabelledSetThreshold:
    min_accuracy: float | None = None  # classification: share of exact answers
    max_error: float | None = None  # regression: mean absolute error


def judge_test_set(
    expected: Sequence[Prediction], answered: Sequence[Prediction], threshold: LabelledSetThreshold
) -> CheckResult:
    """The seed pipeline's "the app is tested with the model": known inputs, known answers."""
    if not expected or len(expected) != len(answered):
        return CheckResult("testSet", CheckState.FAILED, f"{len(answered)} answers for {len(expected)} test rows")
    n = len(expected)
    if threshold.max_error is not None:
        errors = [_abs_error(e, a) for e, a in zip(expected, answered, strict=True)]
        if any(err is None for err in errors):
            return CheckResult("testSet", CheckState.FAILED, "a test answer is not a number")
        mean = sum(err for err in errors if err is not None) / n
        state = CheckState.PASSED if mean <= threshold.max_error else CheckState.FAILED
        relation = "<=" if state is CheckState.PASSED else ">"
        return CheckResult(
            "testSet", state, f"mean error {mean:.4g} {relation} {threshold.max_error:.4g} over {n} rows"
        )
    minimum = 1.0 if threshold.min_accuracy is None else threshold.min_accuracy
    correct = sum(1 for e, a in zip(expected, answered, strict=True) if answers_agree(e, a))
    accuracy = correct / n
    state = CheckState.PASSED if accuracy >= minimum else CheckState.FAILED
    relation = ">=" if state is CheckState.PASSED else "<"
    return CheckResult("testSet", state, f"accuracy {accuracy:.2f} {relation} {minimum:.2f} over {n} rows")


def _abs_error(expected: Prediction, answered: Prediction) -> float | None:
    numbers = (int, float)
    if isinstance(expected, bool) or isinstance(answered, bool):
        return None
    if isinstance(expected, numbers) and isinstance(answered, numbers):
        return abs(float(expected) - float(answered))
    return None


@dataclass(frozen=True)
class HealthThreshold:
    max_error_rate: float  # share of shadowed requests the candidate failed (5xx, time-out)
    max_p99_ms: float
    min_requests: int


def judge_health(requests: int, errors: int, p99_ms: float | None, threshold: HealthThreshold) -> CheckResult:
    """The candidate's own error rate and latency on the shadowed requests."""
    if requests < threshold.min_requests:
        return CheckResult("health", CheckState.PENDING, f"{requests} of {threshold.min_requests} requests seen")
    rate = errors / requests
    if rate > threshold.max_error_rate:
        return CheckResult(
            "health",
            CheckState.FAILED,
            f"error rate {rate:.3f} > {threshold.max_error_rate:.3f} over {requests} requests",
        )
    if p99_ms is not None and p99_ms > threshold.max_p99_ms:
        return CheckResult(
            "health", CheckState.FAILED, f"p99 {p99_ms:.0f} ms > {threshold.max_p99_ms:.0f} ms over {requests} requests"
        )
    p99 = "n/a" if p99_ms is None else f"{p99_ms:.0f} ms"
    return CheckResult("health", CheckState.PASSED, f"error rate {rate:.3f}, p99 {p99} over {requests} requests")


@dataclass(frozen=True)
class GateVerdict:
    state: CheckState
    message: str
    checks: tuple[CheckResult, ...]


def overall(checks: Sequence[CheckResult], elapsed_seconds: float, max_seconds: float) -> GateVerdict:
    """Failed as soon as one check fails; passed when all passed; failed at the deadline if still pending."""
    failed = [c for c in checks if c.state is CheckState.FAILED]
    if failed:
        return GateVerdict(CheckState.FAILED, "; ".join(f"{c.name}: {c.message}" for c in failed), tuple(checks))
    pending = [c for c in checks if c.state is CheckState.PENDING]
    if not pending:
        return GateVerdict(CheckState.PASSED, "; ".join(f"{c.name}: {c.message}" for c in checks), tuple(checks))
    if elapsed_seconds >= max_seconds:
        waiting = "; ".join(f"{c.name}: {c.message}" for c in pending)
        return GateVerdict(CheckState.FAILED, f"timed out after {elapsed_seconds:.0f} s: {waiting}", tuple(checks))
    return GateVerdict(CheckState.PENDING, "; ".join(f"{c.name}: {c.message}" for c in pending), tuple(checks))


# --- the figures the stable pods report (the app's modelapp_shadow_* metrics, modelapp_serving/shadow.py) -----

Sample = tuple[str, Mapping[str, str], float]  # (name, labels, value) as a Prometheus text parser gives them


@dataclass(frozen=True)
class ShadowFigures:
    """What the stable pods' shadows counted for one candidate pair, summed over the pods."""

    agreed: int = 0
    disagreed: int = 0
    errors: int = 0  # the candidate answered non-200, or not a /predict answer
    timeouts: int = 0
    p99_ms: float | None = None  # upper bound of the histogram bucket holding the 99th percentile
    buckets: tuple[tuple[float, float], ...] = ()  # the latency histogram: (upper bound s, cumulative count)

    def record(self) -> dict[str, Any]:
        """As status.gate.baseline keeps it."""
        return {
            "agreed": self.agreed, "disagreed": self.disagreed, "errors": self.errors, "timeouts": self.timeouts,
            "buckets": [{"le": repr(bound), "count": int(count)} for bound, count in self.buckets],
        }  # fmt: skip

    def since(self, baseline: Mapping[str, Any]) -> ShadowFigures:
        """What was counted after `baseline` (a record()): the gate judges the candidate from the moment it was
        Ready, not its start-up. A count that went down (a stable pod restarted) counts from zero."""

        def minus(now: float, then: Any) -> float:
            return max(0.0, now - (float(then) if isinstance(then, int | float) else 0.0))

        before = {str(b.get("le")): b.get("count") for b in baseline.get("buckets") or [] if isinstance(b, Mapping)}
        buckets = {bound: minus(count, before.get(repr(bound))) for bound, count in self.buckets}
        return ShadowFigures(
            agreed=int(minus(self.agreed, baseline.get("agreed"))),
            disagreed=int(minus(self.disagreed, baseline.get("disagreed"))),
            errors=int(minus(self.errors, baseline.get("errors"))),
            timeouts=int(minus(self.timeouts, baseline.get("timeouts"))),
            p99_ms=_quantile_bound(buckets, 0.99),
            buckets=tuple(sorted(buckets.items())),
        )

    @property
    def compared(self) -> int:
        return self.agreed + self.disagreed

    @property
    def requests(self) -> int:
        return self.compared + self.errors + self.timeouts


def shadow_figures(samples: Iterable[Sample], candidate: str) -> ShadowFigures:
    """Sum `modelapp_shadow_comparisons_total` and the latency histogram over every stable pod's samples.

    candidate: the pair as the ModelApp-Pair header names it ("<image digest>/<model version>"); a sample of
    another pair (an earlier candidate) never counts. Counters of pods that restarted start again from zero:
    the gate reads figures as they are now, it never subtracts."""
    outcomes: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for name, labels, value in samples:
        if labels.get("candidate") != candidate or not math.isfinite(value) or value < 0:
            continue
        if name == "modelapp_shadow_comparisons_total":
            outcome = labels.get("outcome", "")
            outcomes[outcome] = outcomes.get(outcome, 0.0) + value
        elif name == "modelapp_shadow_latency_seconds_bucket":
            try:
                bound = float(labels.get("le", ""))
            except ValueError:
                continue
            buckets[bound] = buckets.get(bound, 0.0) + value
    return ShadowFigures(
        agreed=int(outcomes.get("agreed", 0)),
        disagreed=int(outcomes.get("disagreed", 0)),
        errors=int(outcomes.get("error", 0)),
        timeouts=int(outcomes.get("timeout", 0)),
        p99_ms=_quantile_bound(buckets, 0.99),
        buckets=tuple(sorted(buckets.items())),
    )


def _quantile_bound(cumulative: Mapping[float, float], quantile: float) -> float | None:
    """The upper bound (ms) of the first bucket whose cumulative count reaches the quantile; None: no samples.

    An upper bound, not an interpolation: a limit is never passed by a guess (a p99 past the last finite
    bucket is +Inf, which fails any limit)."""
    if not cumulative:
        return None
    total = cumulative.get(math.inf, max(cumulative.values()))
    if total <= 0:
        return None
    for bound in sorted(cumulative):
        if cumulative[bound] >= quantile * total:
            return bound * 1000.0
    return math.inf
