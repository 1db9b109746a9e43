"""The model-blob contract: the publisher, the operator and the app agree on formats, metadata and URLs."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from modelapp_contract.blob import (
    MODEL_FORMATS,
    BlobAddress,
    ModelFormat,
    blob_url,
    is_emulator,
    normalize_etag,
    parse_blob_url,
    published_metadata,
    try_parse_blob_url,
)
from modelapp_operator.api.modelapp_types import ModelFormat as ResourceModelFormat
from modelapp_operator.api.modelapp_types import ModelSpec as ResourceModelSpec
from modelapp_operator.clients.blob_storage import BlobProperties
from modelapp_operator.plan.model_check import check_model
from modelapp_operator.plan.release import ResolvedModel
from modelapp_serving.config import ServingConfig

pytestmark = pytest.mark.unit

CRD = Path(__file__).resolve().parents[2] / "crds" / "modelapp.yaml"
SHA = "a" * 64


def _crd_formats() -> list[str]:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return list(schema["properties"]["spec"]["properties"]["model"]["properties"]["format"]["enum"])


def test_every_side_knows_the_same_formats() -> None:
    assert MODEL_FORMATS == ("onnx", "skops", "pickle")
    assert tuple(f.value for f in ModelFormat) == MODEL_FORMATS  # the app and the publisher
    assert typing.get_args(ResourceModelFormat) == MODEL_FORMATS  # the ModelApp resource
    assert tuple(_crd_formats()) == MODEL_FORMATS  # the CRD schema


def _resource_model(name: str, account_url: str = "https://acct.blob.core.windows.net") -> ResourceModelSpec:
    return ResourceModelSpec.model_validate(
        {
            "blob": {"accountUrl": account_url, "container": "models", "name": name},
            "credentials": {"serviceAccountName": "reader"},
        }
    )


@pytest.mark.parametrize("model_format", list(ModelFormat))
def test_what_the_publisher_writes_the_operator_accepts(model_format: ModelFormat) -> None:
    metadata = published_metadata(SHA, model_format)
    spec = _resource_model("iris/model.bin")
    if model_format is ModelFormat.PICKLE:
        spec = spec.model_copy(update={"allow_pickle": True})
    resolved = check_model(spec, BlobProperties(etag='"0x1"', size=3, last_modified=None, metadata=metadata))
    assert isinstance(resolved, ResolvedModel)
    assert (resolved.sha256, resolved.format) == (SHA, model_format.value)


@pytest.mark.parametrize(
    ("account_url", "name"),
    [
        ("https://acct.blob.core.windows.net", "iris.onnx"),
        ("https://acct.blob.core.windows.net", "team a/iris v2+final.onnx"),
        ("http://127.0.0.1:10000/devstoreaccount1", "models/iris:1.onnx"),
        ("http://azurite.storage.svc:10000/devstoreaccount1", "iris.onnx"),
    ],
)
def test_the_url_the_operator_renders_names_the_same_blob_for_the_app(account_url: str, name: str) -> None:
    url = _resource_model(name, account_url).blob.url
    assert url == blob_url(account_url, "models", name)
    config = ServingConfig.from_env(
        {
            "MODELAPP_MODEL_URL": url,
            "MODELAPP_MODEL_ETAG": '"0x1"',
            "MODELAPP_MODEL_SHA256": SHA,
            "MODELAPP_MODEL_FORMAT": "onnx",
        }
    )
    assert config.model is not None
    assert config.model.location == BlobAddress(account_url, "models", name)
    assert config.model.location.url == url


def test_the_emulator_is_recognised_by_host_or_by_its_account() -> None:
    assert is_emulator("127.0.0.1", "anything")
    assert is_emulator("localhost", "acct")
    assert is_emulator("azurite.storage.svc", "devstoreaccount1")
    assert not is_emulator("acct.blob.core.windows.net", "models")
    address = parse_blob_url("http://azurite.storage.svc:10000/devstoreaccount1/models/iris.onnx")
    assert address.account_name == "devstoreaccount1" and address.container == "models"


def test_bad_urls_are_refused_with_a_reason_or_none() -> None:
    for bad in ("ftp://x/c/b", "https://acct.blob.core.windows.net/only-container", "https://u:p@acct/c/b"):
        with pytest.raises(ValueError):
            parse_blob_url(bad)
        assert try_parse_blob_url(bad) is None


def test_etags_compare_without_quotes_or_weak_prefix() -> None:
    assert normalize_etag('"0x8D"') == normalize_etag("0x8D") == normalize_etag('W/"0x8D"') == "0x8D"
