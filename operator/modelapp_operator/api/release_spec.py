"""spec.release: how a new pair reaches users (Rolling in place, or Gated behind the release gate's checks,
plan/gate.py). Apart from modelapp_types.py only for its size; parsed as part of ModelAppSpec."""

from __future__ import annotations

from typing import Annotated, Literal

from modelapp_operator.api.frozen import FrozenModel
from pydantic import Field, model_validator


class TestSetCheck(FrozenModel):
    """A labelled test set run against the candidate's pods: a JSON blob beside the model (same account and
    container, read with the same credentials) of {"instances": [[...], ...], "expected": [...]}."""

    blob: Annotated[str, Field(min_length=1, max_length=1024)]
    min_accuracy: Annotated[float | None, Field(alias="minAccuracy", ge=0, le=1)] = None
    max_error: Annotated[float | None, Field(alias="maxError", ge=0)] = None

    @model_validator(mode="after")
    def _one_threshold(self) -> TestSetCheck:
        if self.min_accuracy is not None and self.max_error is not None:
            raise ValueError("release.testSet: set minAccuracy (classification) or maxError (regression), not both")
        return self


class ShadowCheck(FrozenModel):
    """Live requests also sent to the candidate, its answers compared with the stable pair's."""

    percent: Annotated[int, Field(ge=1, le=100)] = 100
    min_agreement: Annotated[float, Field(alias="minAgreement", ge=0, le=1)] = 0.95
    min_samples: Annotated[int, Field(alias="minSamples", ge=1, le=1_000_000)] = 100
    tolerance: Annotated[float, Field(ge=0)] = 0.0


class HealthCheck(FrozenModel):
    """The candidate's error rate and p99 latency on the shadowed requests."""

    max_error_rate: Annotated[float, Field(alias="maxErrorRate", ge=0, le=1)] = 0.01
    max_p99_milliseconds: Annotated[int, Field(alias="maxP99Milliseconds", ge=1, le=600_000)] = 1000
    min_requests: Annotated[int, Field(alias="minRequests", ge=1, le=1_000_000)] = 100


class ReleaseSpec(FrozenModel):
    """spec.release: Rolling (the default) rolls a new pair in place; Gated runs it as a candidate beside the
    stable pair and switches the Service to it only when its checks pass (plan/gate.py, issue 20)."""

    strategy: Literal["Rolling", "Gated"] = "Rolling"
    test_set: Annotated[TestSetCheck | None, Field(alias="testSet")] = None
    shadow: ShadowCheck | None = None
    health: HealthCheck | None = None
    timeout_seconds: Annotated[int, Field(alias="timeoutSeconds", ge=30, le=86400)] = 900
    promotion: Literal["Auto", "Manual"] = "Auto"
    drain_seconds: Annotated[int, Field(alias="drainSeconds", ge=0, le=3600)] = 30

    @model_validator(mode="after")
    def _gated_needs_a_check(self) -> ReleaseSpec:
        if self.strategy == "Gated" and self.test_set is None and self.shadow is None:
            raise ValueError("release: a Gated release needs testSet or shadow (health needs shadow's traffic)")
        if self.health is not None and self.shadow is None:
            raise ValueError("release.health: needs release.shadow (it judges the shadowed requests)")
        return self

    @property
    def gated(self) -> bool:
        return self.strategy == "Gated"
