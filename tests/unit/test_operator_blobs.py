"""Checking the blob's properties against the spec's pins."""

from __future__ import annotations

from typing import Any

import pytest
from modelapp_operator.api.modelapp_types import ModelSpec
from modelapp_operator.clients.blob_storage import BlobProperties, ModelResolutionError, check_model

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


def test_follows_current_version_from_metadata() -> None:
    model = check_model(spec(), props(sha256=SHA, format="onnx"))
    assert model.version == '"0x8DC1"' and model.sha256 == SHA and model.format == "onnx"
    assert model.url == "https://acct.blob.core.windows.net/models/iris.onnx" and model.size == 10


def test_pinned_version_matches_with_or_without_quotes() -> None:
    assert check_model(spec(version="0x8DC1"), props(sha256=SHA, format="onnx")).version == '"0x8DC1"'


def test_spec_pins_fill_missing_metadata() -> None:
    model = check_model(spec(sha256=SHA, format="skops"), props())
    assert (model.sha256, model.format) == (SHA, "skops")


@pytest.mark.parametrize(
    ("overrides", "metadata", "reason"),
    [
        ({"version": '"0x8DC0"'}, {"sha256": SHA, "format": "onnx"}, "ModelVersionMismatch"),
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
    with pytest.raises(ModelResolutionError) as caught:
        check_model(spec(**overrides), props(**metadata))
    assert caught.value.reason == reason


def test_pickle_allowed_when_consented() -> None:
    assert check_model(spec(allowPickle=True), props(sha256=SHA, format="pickle")).format == "pickle"
