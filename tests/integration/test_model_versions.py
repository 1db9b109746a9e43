"""Immutable model versions against Azurite (snapshots; Azurite has no blob versioning): the operator's
snapshot is taken only on the ETag it resolved, keeps v1's bytes after v2 overwrites the blob, the app
downloads exactly that snapshot, and pruning deletes only the operator's own snapshots of pairs that
left history, so their number stays bounded however often the model is published."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient
from modelapp_contract.blob import ModelFormat, PinnedVersion, blob_url
from modelapp_localstack import Azurite
from modelapp_operator.api.modelapp_types import BlobLocation
from modelapp_operator.clients.blob_storage import (
    AzureBlobResolver,
    BlobProperties,
    ConnectionStringCredential,
    ModelResolutionError,
)
from modelapp_operator.names import Reason
from modelapp_operator.plan.history import HISTORY_LIMIT, kept_snapshots, record_release
from modelapp_operator.plan.release import Release, ResolvedImage, ResolvedModel
from modelapp_serving.config import ModelSpec
from modelapp_serving.download import DownloadSettings, fetch_verified_model

pytestmark = pytest.mark.integration

DIGEST = "sha256:" + "a" * 64
OWNER = "uid-of-the-modelapp"


@pytest.fixture(scope="module")
def container(azurite: Azurite) -> ContainerClient:
    client = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        f"v-{uuid.uuid4().hex[:8]}"
    )
    client.create_container()
    return client


def publish(container: ContainerClient, name: str, content: bytes) -> str:
    sha = hashlib.sha256(content).hexdigest()
    result = container.get_blob_client(name).upload_blob(
        content, overwrite=True, metadata={"sha256": sha, "format": "onnx"}
    )
    return str(result["etag"])


def snapshots(container: ContainerClient, name: str) -> list[Any]:
    return [b for b in container.list_blobs(name_starts_with=name, include=["snapshots", "metadata"])
            if b.name == name and b.snapshot]  # fmt: skip


def location(azurite: Azurite, container: ContainerClient, name: str) -> BlobLocation:
    return BlobLocation(account_url=azurite.blob_endpoint, container=container.container_name, name=name)


def test_snapshot_keeps_v1_bytes_and_is_taken_only_on_the_resolved_etag(
    azurite: Azurite, container: ContainerClient, tmp_path: Path
) -> None:
    name = "m/model.onnx"
    credential = ConnectionStringCredential(azurite.connection_string)
    where = location(azurite, container, name)
    v1 = b"model v1 " * 100
    publish(container, name, v1)

    async def scenario() -> tuple[PinnedVersion, BlobProperties, BlobProperties]:
        resolver = AzureBlobResolver()
        try:
            resolved = await resolver.get_properties(where, credential)
            pin = await resolver.snapshot(where, credential, resolved, OWNER)
            publish(container, name, b"model v2")  # v2 over it
            with pytest.raises(ModelResolutionError) as stale:  # the resolved ETag is gone: nothing captured
                await resolver.snapshot(where, credential, resolved, OWNER)
            assert stale.value.reason == Reason.MODEL_VERSION_MISMATCH
            return pin, resolved, await resolver.pinned_properties(where, credential, pin)
        finally:
            await resolver.close()

    pin, resolved, pinned = asyncio.run(scenario())
    assert pin.snapshot and pinned.etag == resolved.etag  # the snapshot carries the ETag it was taken on
    assert pinned.metadata["sha256"] == hashlib.sha256(v1).hexdigest()
    assert len(snapshots(container, name)) == 1
    # The app, given the pin, downloads exactly v1's bytes (and verifies them) although the blob is v2 now.
    spec = ModelSpec(
        url=blob_url(azurite.blob_endpoint, container.container_name, name),
        etag=resolved.etag,
        sha256=hashlib.sha256(v1).hexdigest(),
        format=ModelFormat.ONNX,
        pin=pin,
    )
    fetched = fetch_verified_model(spec, tmp_path, DownloadSettings(connection_string=azurite.connection_string))
    assert fetched.path.read_bytes() == v1


def test_prune_deletes_only_the_operators_own_snapshots(azurite: Azurite, container: ContainerClient) -> None:
    name = "p/model.onnx"
    credential = ConnectionStringCredential(azurite.connection_string)
    where = location(azurite, container, name)
    publish(container, name, b"x")
    blob = container.get_blob_client(name)
    users = blob.create_snapshot()["snapshot"]  # a user's own snapshot: never ours to delete
    others = blob.create_snapshot(metadata={"modelapppinnedby": "another-modelapp"})["snapshot"]

    async def scenario() -> tuple[int, PinnedVersion]:
        resolver = AzureBlobResolver()
        try:
            properties = await resolver.get_properties(where, credential)
            old = await resolver.snapshot(where, credential, properties, OWNER)
            kept = await resolver.snapshot(where, credential, properties, OWNER)
            assert old.snapshot and kept.snapshot
            return await resolver.prune(where, credential, OWNER, {kept.snapshot}), kept
        finally:
            await resolver.close()

    deleted, kept = asyncio.run(scenario())
    assert deleted == 1
    assert {str(b.snapshot) for b in snapshots(container, name)} == {str(users), str(others), str(kept.snapshot)}


def test_snapshots_stay_bounded_over_50_publishes(azurite: Azurite, container: ContainerClient) -> None:
    """What the operator does per new version: resolve, snapshot on that ETag, record the pair in
    history (bounded at HISTORY_LIMIT), write status, prune what status no longer names."""
    name = "b/model.onnx"
    credential = ConnectionStringCredential(azurite.connection_string)
    where = location(azurite, container, name)
    url = blob_url(azurite.blob_endpoint, container.container_name, name)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    counts: list[int] = []

    async def publish_and_roll(status: dict[str, Any], n: int) -> dict[str, Any]:
        resolver = AzureBlobResolver()
        try:
            publish(container, name, f"model v{n}".encode())
            properties = await resolver.get_properties(where, credential)
            pin = await resolver.snapshot(where, credential, properties, OWNER)
            model = ResolvedModel(url, properties.etag, properties.metadata["sha256"], "onnx", pin=pin)
            history = record_release(status.get("history") or [], Release(ResolvedImage("r/x", DIGEST), model),
                                     start + timedelta(minutes=n))  # fmt: skip
            new = {"model": {"url": url, "version": properties.etag, "snapshot": pin.snapshot}, "history": history}
            if kept_snapshots(new) != kept_snapshots(status):
                await resolver.prune(where, credential, OWNER, kept_snapshots(new))
            return new
        finally:
            await resolver.close()

    status: dict[str, Any] = {}
    for n in range(1, 51):
        status = asyncio.run(publish_and_roll(status, n))
        counts.append(len(snapshots(container, name)))
    print(f"snapshots after each of 50 publishes: max {max(counts)}, after the 50th {counts[-1]}")
    assert counts[-1] == HISTORY_LIMIT
    assert max(counts) <= HISTORY_LIMIT
    remaining = {b.snapshot for b in snapshots(container, name)}
    assert remaining == kept_snapshots(status)


def test_signed_publish_verifies_and_tampered_bytes_with_its_metadata_are_refused(
    azurite: Azurite, container: ContainerClient, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from modelapp_contract.signing import decode_bundle, verify_signature
    from modelapp_serving.download import ModelFetchError
    from modelapp_serving.publish import publish_model

    key = ec.generate_private_key(ec.SECP256R1())
    private = tmp_path / "key.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"signed model bytes")
    name = "s/model.onnx"
    published = publish_model(
        model, (container.container_name, name), connection_string=azurite.connection_string, sign_key=private,
        progress=False,
    )  # fmt: skip
    blob = container.get_blob_client(name)
    metadata = blob.get_blob_properties().metadata
    signed = verify_signature(decode_bundle(metadata["modelsignature"]), public)
    assert signed.sha256 == published.sha256 and signed.signer == published.signer
    assert container.get_blob_client(name + ".sig").download_blob().readall() == decode_bundle(
        metadata["modelsignature"]
    )
    # Other bytes under the same (valid) metadata and signature: the app refuses them before loading.
    tampered = blob.upload_blob(b"other model bytes", overwrite=True, metadata=dict(metadata))
    spec = ModelSpec(
        url=blob_url(azurite.blob_endpoint, container.container_name, name),
        etag=str(tampered["etag"]),
        sha256=signed.sha256,
        format=ModelFormat.ONNX,
        signature_public_key=public,
    )
    with pytest.raises(ModelFetchError, match="refusing it") as refused:
        fetch_verified_model(spec, tmp_path / "cache", DownloadSettings(connection_string=azurite.connection_string))
    assert not refused.value.retryable
    assert not any((tmp_path / "cache").glob("*.onnx"))
