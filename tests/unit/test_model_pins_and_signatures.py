"""Immutable model versions and signatures, pure parts: the pin's addressing (the blob service's
documented `versionid` / `snapshot` query parameters and `x-ms-version-id` response header, as the
Azure SDK builds and reads them), status and history recording the pin, rollbacks finding it,
pruning keeping it, the ModelVerified condition, and OpenSSF model signing of one file."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from azure.core.pipeline.transport import HttpTransport
from azure.storage.blob import BlobClient
from azure.storage.blob import BlobProperties as SdkBlobProperties
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from modelapp_contract.blob import ModelFormat, PinnedVersion
from modelapp_contract.signing import SignatureError, encode_bundle, sign_model_file, verify_signature
from modelapp_operator.api.modelapp_types import ModelSpec as OperatorModelSpec
from modelapp_operator.clients.blob_storage import BlobProperties, _properties
from modelapp_operator.names import ConditionType, Reason
from modelapp_operator.plan.history import _release_from_entry, kept_snapshots, known_pin, record_release
from modelapp_operator.plan.model_check import ModelRefusal, check_model
from modelapp_operator.plan.release import Release, ResolvedImage, ResolvedModel, release_from_status
from modelapp_operator.plan.status import Condition, verified_condition
from modelapp_serving.config import ModelSpec, ServingConfig
from modelapp_serving.download import DownloadSettings, make_blob_client

pytestmark = pytest.mark.unit

URL = "https://acct.blob.core.windows.net/models/iris.onnx"
SHA = "b" * 64
DIGEST = "sha256:" + "a" * 64
VERSION_ID = "2026-11-28T06:55:07.8510000Z"
# Loopback only: the recording transport answers, nothing is sent anywhere.
CONNECTION = (
    "DefaultEndpointsProtocol=http;AccountName=acct;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "BlobEndpoint=http://127.0.0.1:9/acct;"
)
NOW = datetime(2026, 11, 28, tzinfo=UTC)


def test_pin_query_round_trips_and_names_one_kind() -> None:
    for pin, query in (
        (PinnedVersion(version_id=VERSION_ID), "versionid=2026-11-28T06%3A55%3A07.8510000Z"),
        (PinnedVersion(snapshot=VERSION_ID), "snapshot=2026-11-28T06%3A55%3A07.8510000Z"),
    ):
        assert pin.query == query and PinnedVersion.from_query(query) == pin
    assert PinnedVersion().query == "" and PinnedVersion().kind == "etag"
    with pytest.raises(ValueError):
        PinnedVersion(version_id="a", snapshot="b")
    with pytest.raises(ValueError):
        PinnedVersion.from_query("etag=x")


def test_version_id_is_read_from_the_documented_response_header() -> None:
    # Get Blob Properties on an account with versioning answers x-ms-version-id (and x-ms-is-current-version).
    sdk = SdkBlobProperties(
        metadata={"sha256": SHA, "format": "onnx"},
        **{"ETag": '"0x8DC1"', "Content-Length": 10, "x-ms-version-id": VERSION_ID, "x-ms-is-current-version": True},
    )
    properties = _properties(sdk)
    assert properties.version_id == VERSION_ID and properties.etag == '"0x8DC1"'


class _Recorder(HttpTransport):  # type: ignore[type-arg]
    """Records the request the SDK sends and answers with the documented Get Blob Properties shape."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *args: object) -> None:
        return None

    def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    def send(self, request: Any, **kwargs: Any) -> Any:
        from azure.core.pipeline.transport import RequestsTransportResponse
        from requests import Response

        self.urls.append(request.url)
        raw = Response()
        raw.status_code = 200
        raw.headers.update(
            {"ETag": '"0x8DC1"', "Content-Length": "0", "x-ms-version-id": VERSION_ID, "x-ms-meta-sha256": SHA}
        )
        raw._content = b""
        return RequestsTransportResponse(request, raw)


def test_the_app_addresses_exactly_the_pinned_version() -> None:
    # The app's client carries the pin ...
    for pin in (PinnedVersion(version_id=VERSION_ID), PinnedVersion(snapshot=VERSION_ID)):
        spec = ModelSpec(url=URL, etag='"0x8DC1"', sha256=SHA, format=ModelFormat.ONNX, pin=pin)
        client = make_blob_client(spec, DownloadSettings(connection_string=CONNECTION))
        assert (client.version_id, client.snapshot) == (pin.version_id, pin.snapshot)
    # ... and the SDK sends it as the documented `versionid` / `snapshot` query (recorded, nothing sent).
    pins: tuple[tuple[dict[str, Any], str], ...] = (
        ({"version_id": VERSION_ID}, "versionid="),
        ({"snapshot": VERSION_ID}, "snapshot="),
    )
    for kwargs, query in pins:
        recorder = _Recorder()
        client = BlobClient.from_connection_string(CONNECTION, "models", "iris.onnx", transport=recorder, **kwargs)
        properties = client.get_blob_properties()
        sent = unquote(recorder.urls[0])
        assert f"?{query}{VERSION_ID}" in sent or f"&{query}{VERSION_ID}" in sent
        assert properties.version_id == VERSION_ID  # the documented x-ms-version-id response header


def test_config_reads_the_pin_and_the_public_key() -> None:
    env = {
        "MODELAPP_MODEL_URL": URL,
        "MODELAPP_MODEL_ETAG": '"0x8DC1"',
        "MODELAPP_MODEL_SHA256": SHA,
        "MODELAPP_MODEL_FORMAT": "onnx",
        "MODELAPP_MODEL_PIN": f"snapshot={VERSION_ID}",
        "MODELAPP_MODEL_SIGNATURE_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\n...",
    }
    model = ServingConfig.from_env(env).model
    assert model is not None and model.pin == PinnedVersion(snapshot=VERSION_ID)
    assert model.signature_public_key is not None


def _release(pin: PinnedVersion, etag: str = '"0x1"') -> Release:
    return Release(ResolvedImage("r.io/a/b", DIGEST), ResolvedModel(URL, etag, SHA, "onnx", pin=pin))


def test_history_and_status_carry_the_pin_and_a_rollback_finds_it() -> None:
    v1 = PinnedVersion(snapshot="s1")
    history = record_release([], _release(v1, '"0x1"'), NOW)
    history = record_release(history, _release(PinnedVersion(snapshot="s2"), '"0x2"'), NOW)
    assert history[1]["modelSnapshot"] == "s1"
    status = {
        "image": {"repository": "r.io/a/b", "digest": DIGEST},
        "model": {"url": URL, "version": '"0x2"', "sha256": SHA, "format": "onnx", "snapshot": "s2"},
        "history": history,
    }
    assert known_pin(status, URL, "0x1") == v1  # `modelapp rollback` pins the ETag; the snapshot comes back
    assert known_pin(status, URL, '"0x9"') is None
    restored = _release_from_entry(_spec(), history[1])
    assert restored is not None and restored.model.pin == v1
    assert kept_snapshots(status) == {"s1", "s2"}
    current = release_from_status(status)
    assert current is not None and current.model.pin == PinnedVersion(snapshot="s2")


def _spec() -> Any:
    from modelapp_operator.api.modelapp_types import ModelAppSpec

    return ModelAppSpec.model_validate(
        {
            "image": {"repository": "r.io/a/b", "tag": "1"},
            "model": {
                "blob": {
                    "accountUrl": "https://acct.blob.core.windows.net",
                    "container": "models",
                    "name": "iris.onnx",
                },
                "credentials": {"secretRef": {"name": "storage"}},
            },
        }
    )


def _keys(tmp_path: Path, name: str) -> tuple[Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = tmp_path / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def test_a_signature_names_the_files_sha256_and_only_its_key_verifies_it(tmp_path: Path) -> None:
    model = tmp_path / "iris.onnx"
    model.write_bytes(b"model bytes")
    private, public = _keys(tmp_path, "signer")
    _, other = _keys(tmp_path, "other")
    bundle = sign_model_file(model, private)
    signed = verify_signature(bundle, public)
    assert signed.sha256 == hashlib.sha256(b"model bytes").hexdigest() and signed.signer.startswith("SHA256:")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(bundle, other)
    with pytest.raises(SignatureError):
        verify_signature(bundle.replace(b'"sig"', b'"xsig"'), public)
    # The operator takes the signed sha256, not the metadata's; metadata naming other bytes is refused.
    spec = OperatorModelSpec.model_validate(
        {
            "blob": {"accountUrl": "https://acct.blob.core.windows.net", "container": "models", "name": "iris.onnx"},
            "credentials": {"secretRef": {"name": "storage"}},
            "signature": {"publicKey": {"configMapRef": {"name": "keys"}}},
        }
    )
    metadata = {"sha256": signed.sha256, "format": "onnx", "modelsignature": encode_bundle(bundle)}
    resolved = check_model(spec, BlobProperties('"0x1"', 11, None, metadata), signed)
    assert isinstance(resolved, ResolvedModel)
    assert (resolved.sha256, resolved.verified_by, resolved.signer) == (signed.sha256, "signature", signed.signer)
    refused = check_model(spec, BlobProperties('"0x1"', 11, None, {**metadata, "sha256": SHA}), signed)
    assert isinstance(refused, ModelRefusal) and refused.reason == Reason.SIGNATURE_INVALID
    # A required signature that is not there is refused, whatever the metadata says.
    unsigned = check_model(spec, BlobProperties('"0x1"', 11, None, {"sha256": SHA, "format": "onnx"}))
    assert isinstance(unsigned, ModelRefusal) and unsigned.reason == Reason.SIGNATURE_MISSING


def test_model_verified_says_how_and_why_not() -> None:
    resolved = Condition(ConditionType.MODEL_RESOLVED, "True", Reason.RESOLVED, "")
    verified = verified_condition(_release(PinnedVersion(snapshot="s1")), resolved)
    assert (verified.status, verified.reason) == (
        "True",
        Reason.SHA256_FROM_METADATA,
    ) and "snapshot s1" in verified.message
    unsigned = Condition(ConditionType.MODEL_RESOLVED, "False", Reason.SIGNATURE_MISSING, "not signed")
    assert verified_condition(None, unsigned).reason == Reason.SIGNATURE_MISSING
    refused = verified_condition(_release(PinnedVersion()), resolved, "sha256 of ... is x, expected y: refusing it")
    assert (refused.status, refused.reason) == ("False", Reason.MODEL_REFUSED)
