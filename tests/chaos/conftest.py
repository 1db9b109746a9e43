"""Fault tests: the real stack (tests/conftest.py) with its parts killed, restarted and stopped for a while."""

from __future__ import annotations

import contextlib

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient
from modelapp_localstack import Azurite


@pytest.fixture(scope="module")
def models(azurite: Azurite) -> ContainerClient:
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client("models")
    with contextlib.suppress(Exception):
        container.create_container()
    return container
