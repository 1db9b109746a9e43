"""Azurite, the registry and buildah are real and reachable on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError
from azure.storage.blob import BlobServiceClient
from modelapp_localstack import Azurite, Registry, Stack

pytestmark = pytest.mark.integration


def test_azurite_round_trips_a_blob_with_its_etag(azurite: Azurite) -> None:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.get_container_client("stack-test")
    if not container.exists():
        container.create_container()
    blob = container.get_blob_client("hello.txt")
    first = blob.upload_blob(b"first", overwrite=True, metadata={"sha256": "x"})
    properties = blob.get_blob_properties()
    assert properties.etag == first["etag"]
    assert properties.metadata == {"sha256": "x"}
    assert blob.download_blob(etag=first["etag"], match_condition=MatchConditions.IfNotModified).readall() == b"first"

    blob.upload_blob(b"second", overwrite=True)
    # A reader pinned to the old ETag must be refused, not handed the new content.
    with pytest.raises(ResourceModifiedError):
        blob.download_blob(etag=first["etag"], match_condition=MatchConditions.IfNotModified).readall()


def test_buildah_image_is_pushed_and_its_tag_resolves_to_the_digest(
    local_stack: Stack, registry: Registry, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /hello.txt\n")
    (tmp_path / "hello.txt").write_text("hello from buildah\n")
    image = f"{registry.host}/stack-test/hello:v1"
    buildah = local_stack.buildah()
    buildah.build(tmp_path, image)
    pushed = buildah.push(image, registry)
    assert pushed.startswith("sha256:")
    assert registry.resolve("stack-test/hello", "v1") == pushed


def test_registry_rejects_anonymous_requests(registry: Registry) -> None:
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(registry.ca_file))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{registry.url}/v2/", context=context, timeout=5)
    with refused.value as response:
        assert response.code == 401
        assert "Basic" in response.headers.get("WWW-Authenticate", "")
