"""The model side's decisions (plan/model_check.py): the blob's properties against the spec's pins."""

from __future__ import annotations

from typing import Any

import pytest
from modelapp_contract.blob import PinnedVersion
from modelapp_operator.api.modelapp_types import ModelSpec
from modelapp_operator.clients.blob_storage import BlobProperties
from modelapp_operator.plan.model_check import ModelRefusal, check_model, version_to_read
from modelapp_operator.plan.release import ResolvedModel

pytestmark = pytest.mark.unit

SHA = "c" * 64


def spec(**overrides: Any) -> ModelSpec:
    data: dict[str, Any] = {
        "blob": {"accountUrl": "https://acct.blob.core.windows.net", "container": "models", "name": "iris.onnx"},
        "credentials": {"secretRef": {"name": "storage"}},
    }
    data.update(overrides)
    return ModelSpec.model_validate(data)


def props(etag: str = '"0x8DC1"', **metadata: str) -> BlobProperties:
    return BlobProperties(etag=etag, size=10, last_modified="2026-01-01T00:00:00+00:00", metadata=metadata)


def checked(model: ModelSpec, read: BlobProperties) -> ResolvedModel:
    resolved = check_model(model, read)
    assert isinstance(resolved, ResolvedModel), resolved
    return resolved


def test_follows_current_version_from_metadata() -> None:
    model = checked(spec(), props(sha256=SHA, format="onnx"))
    assert model.version == '"0x8DC1"' and model.sha256 == SHA and model.format == "onnx"
    assert model.url == "https://acct.blob.core.windows.net/models/iris.onnx" and model.size == 10


def test_pinned_version_matches_with_or_without_quotes() -> None:
    assert version_to_read(spec(version="0x8DC1"), props(), {}, can_restore=True) is None
    assert checked(spec(version="0x8DC1"), props(sha256=SHA, format="onnx")).version == '"0x8DC1"'


def test_an_earlier_version_is_read_from_its_recorded_pin_or_refused() -> None:
    url = "https://acct.blob.core.windows.net/models/iris.onnx"
    status = {"model": {"url": url, "version": '"0x8DC0"', "snapshot": "2026-01-01T00:00:00Z"}}
    earlier = spec(version='"0x8DC0"')
    assert version_to_read(earlier, props(), status, can_restore=True) == PinnedVersion(snapshot="2026-01-01T00:00:00Z")
    for refused in (
        version_to_read(earlier, props(), {}, can_restore=True),  # nothing recorded for it
        version_to_read(earlier, props(), status, can_restore=False),  # no pinner to read it with
    ):
        assert isinstance(refused, ModelRefusal) and refused.reason == "ModelVersionMismatch"


def test_spec_pins_fill_missing_metadata() -> None:
    model = checked(spec(sha256=SHA, format="skops"), props())
    assert (model.sha256, model.format) == (SHA, "skops")


@pytest.mark.parametrize(
    ("overrides", "metadata", "reason"),
    [
        ({"sha256": "d" * 64}, {"sha256": SHA, "format": "onnx"}, "ModelChecksumMismatch"),
        ({}, {"format": "onnx"}, "ModelChecksumMissing"),
        ({}, {"sha256": "xyz", "format": "onnx"}, "ModelMetadataInvalid"),
        ({}, {"sha256": SHA}, "ModelFormatUnknown"),
        ({}, {"sha256": SHA, "format": "tensorflow"}, "ModelFormatUnknown"),
        ({"format": "skops"}, {"sha256": SHA, "format": "onnx"}, "ModelFormatMismatch"),
        ({}, {"sha256": SHA, "format": "pickle"}, "PickleNotAllowed"),
    ],
)
def test_mismatches(overrides: dict[str, Any], metadata: dict[str, str], reason: str) -> None:
    refused = check_model(spec(**overrides), props(**metadata))
    assert isinstance(refused, ModelRefusal) and refused.reason == reason


def test_pickle_allowed_when_consented() -> None:
    assert checked(spec(allowPickle=True), props(sha256=SHA, format="pickle")).format == "pickle"
