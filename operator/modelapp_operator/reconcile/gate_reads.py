"""The release gate's reads for one reconcile (plan/gate.py decides from them): the candidate's Deployment
and Service, the stable pods' shadow counts, and the test set run against the candidate.

A read that fails leaves its check pending and is logged; the gate's own deadline decides. A tenant's pod
that does not answer must not fail the reconcile of its stable pair.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from modelapp_operator.api.modelapp_types import BlobLocation, ModelApp
from modelapp_operator.clients.app_pods import CandidateUnreachable, TestSetError, parse_test_set, pod_base_urls
from modelapp_operator.clients.blob_storage import ModelResolutionError
from modelapp_operator.plan.autoscaling import scale_selector
from modelapp_operator.plan.children import shadow_url
from modelapp_operator.plan.gate import GateFigures, candidate_ready, gate_candidate, wants_figures
from modelapp_operator.plan.release_gate import (
    CheckResult,
    CheckState,
    LabelledSetThreshold,
    ShadowFigures,
    judge_test_set,
    shadow_figures,
)
from modelapp_operator.reconcile.deps import Clients
from modelapp_operator.reconcile.resolve import check_account, model_credential

_log = logging.getLogger(__name__)


async def read_gate_figures(
    clients: Clients, app: ModelApp, deployment: Mapping[str, Any] | None, service: Mapping[str, Any] | None
) -> GateFigures:
    """While a gate tests and its candidate is Ready: the stable pods' shadow counts and, once, the test set."""
    gate = app.status.get("gate") or {}
    read_shadow, run_test_set = wants_figures(app.spec.release, gate)
    if clients.app_pods is None or not candidate_ready(deployment, app.spec.replicas, gate):
        return GateFigures()
    shadow: ShadowFigures | None = None
    test_set: CheckResult | None = None
    label = gate_candidate(gate)
    if read_shadow and label is not None:
        stable_pods = await clients.kube.list_pods(app.namespace, scale_selector(app))
        read = await clients.app_pods.shadow_samples(pod_base_urls(stable_pods, app.spec.port))
        for error in read.errors:
            _log.info("%s/%s: gate: a stable pod's metrics were not read: %s", app.namespace, app.name, error)
        shadow = shadow_figures(read.samples, label)
    url = shadow_url(service)
    if run_test_set and app.spec.release.test_set is not None and url is not None:
        test_set = await _run_test_set(clients, app, app.spec.release.test_set.blob, url, gate_candidate(gate))
    return GateFigures(shadow=shadow, test_set=test_set)


async def _run_test_set(
    clients: Clients, app: ModelApp, blob: str, candidate_url: str, pair: str | None
) -> CheckResult | None:
    """The test set blob (beside the model, the model's credentials and allow-list), run against the candidate."""
    spec = app.spec.release.test_set
    assert spec is not None and clients.app_pods is not None
    model_location = app.spec.model.blob
    location = BlobLocation(account_url=model_location.account_url, container=model_location.container, name=blob)
    try:
        if clients.blob_reader is None:
            raise TestSetError("this operator reads no blobs (no storage client)")
        credential = await model_credential(app, clients.kube)
        check_account(app, location, credential, clients.sources)
        test_set = parse_test_set(await clients.blob_reader.read_blob(location, credential))
        answered = await clients.app_pods.predictions(candidate_url, test_set.instances, pair)
    except ModelResolutionError as error:
        return CheckResult("testSet", CheckState.FAILED, f"test set {blob}: {error.reason}: {error.message}")
    except TestSetError as error:
        return CheckResult("testSet", CheckState.FAILED, f"test set {blob}: {error}")
    except CandidateUnreachable as error:
        _log.info("%s/%s: gate: test set not run yet: %s", app.namespace, app.name, error)
        return None
    threshold = LabelledSetThreshold(min_accuracy=spec.min_accuracy, max_error=spec.max_error)
    return judge_test_set(test_set.expected, answered, threshold)
