"""Status writes: the merge patch removes what no longer applies; a stale read fails with ConflictError."""

from __future__ import annotations

import pytest
from modelapp_operator.clients.kube import merge_patch

pytestmark = pytest.mark.unit


def test_a_field_that_no_longer_applies_is_removed() -> None:
    before = {"image": {"repository": "r", "tag": "1.0", "digest": "sha256:a"}, "replicas": 1}
    after = {"image": {"repository": "r", "digest": "sha256:b"}, "replicas": 1}
    assert merge_patch(before, after) == {"image": {"tag": None, "digest": "sha256:b"}}


def test_new_fields_lists_and_whole_removed_stanzas() -> None:
    before = {"conditions": [{"type": "Ready"}], "failedPairs": [{"imageDigest": "x"}]}
    after = {"conditions": [{"type": "Ready"}, {"type": "Degraded"}], "history": []}
    assert merge_patch(before, after) == {
        "conditions": [{"type": "Ready"}, {"type": "Degraded"}],
        "history": [],
        "failedPairs": None,
    }


def test_unchanged_status_patches_nothing() -> None:
    status = {"image": {"digest": "d"}, "conditions": []}
    assert merge_patch(status, dict(status)) == {}
