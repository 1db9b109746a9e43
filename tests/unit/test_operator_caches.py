"""The watch copies kept for reconciles (reconcile/caches.py): only what plan/ reads, deflated, and our own
apply answers only until the watch has caught up with them."""

from __future__ import annotations

from typing import Any

import pytest
from modelapp_operator.reconcile.caches import SWEPT_PER_APPLY, ChildCache, Stored

pytestmark = pytest.mark.unit


def _deployment(generation: int, rv: str) -> dict[str, Any]:
    container = {"name": "app", "image": "r/i@sha256:ab", "env": [{"name": "X", "value": "y" * 500}], "ports": []}
    return {
        "metadata": {"generation": generation, "resourceVersion": rv, "annotations": {"a": "b"}, "managedFields": [{}]},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "x"}},
            "template": {
                "metadata": {"annotations": {"pair": "p"}},
                "spec": {"containers": [container], "volumes": []},
            },
        },
        "status": {"readyReplicas": 2},
    }


def test_a_kept_copy_has_what_plan_reads_of_a_pod_template_and_is_deflated() -> None:
    body = _deployment(3, "40")
    stored = Stored.of(body)
    kept = stored.body()
    assert kept["spec"]["template"] == {
        "metadata": {"annotations": {"pair": "p"}},
        "spec": {"containers": [{"name": "app", "image": "r/i@sha256:ab"}]},
    }
    assert kept["spec"]["replicas"] == 2 and kept["spec"]["selector"] == body["spec"]["selector"]
    assert kept["status"] == body["status"] and "managedFields" not in kept["metadata"]
    assert (stored.generation, stored.resource_version) == (3, 40)
    assert len(stored.deflated) < 300  # the env's 500 bytes went with the pod spec
    modelapp = {"metadata": {"generation": 1}, "spec": {"image": {"repository": "r"}}, "status": {"x": [1]}}
    assert Stored.of(modelapp).body() == modelapp  # no pod template: kept whole


def test_our_apply_answers_go_once_the_watch_has_caught_up_with_them() -> None:
    watched: dict[tuple[str, str, str], Stored] = {}
    children = ChildCache(lambda *key: watched.get(key))
    children.applied("Service", "ns", "a", _deployment(1, "10"))
    children.applied("Deployment", "ns", "a", _deployment(1, "11"))
    watched[("Service", "ns", "a")] = Stored.of(_deployment(1, "10"))  # delivered: as new as our answer
    watched[("Deployment", "ns", "a")] = Stored.of(_deployment(1, "9"))  # not yet: older than our answer
    children.applied("Service", "ns", "b", _deployment(1, "12"))  # each apply looks at the oldest answers
    assert SWEPT_PER_APPLY >= 2
    assert list(children._applied) == [("Deployment", "ns", "a"), ("Service", "ns", "b")]
    assert children.get("Deployment", "ns", "a") == Stored.of(_deployment(1, "11")).body()  # ours, newer
