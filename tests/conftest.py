"""Session fixtures that start the real local stack (deploy/local/modelapp_localstack).

Each component starts on first use and stops at the end of the session, so a
unit-only run starts nothing. Everything listens on loopback only, or, when a collected test is
marked `pods`, on the host side of the real node's own network (modelapp_localstack.node).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.procs import free_port
from modelapp_localstack.prometheus import Prometheus

# Whether any collected test runs real containers: only then does the session's stack get a real node.
NEEDS_REAL_NODE = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[NEEDS_REAL_NODE] = any(item.get_closest_marker("pods") for item in items)


@pytest.fixture(scope="session")
def local_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    stack = Stack.create(
        keep_run_dir=os.environ.get("MODELAPP_KEEP_RUN_DIR") == "1",
        real_nodes=1 if request.config.stash.get(NEEDS_REAL_NODE, False) else 0,
    )
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def registry_notify_port() -> int:
    """Port the registry sends push notifications to (the operator's receiver listens there)."""
    return free_port()


@pytest.fixture(scope="session")
def registry_notify_token() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def azurite(local_stack: Stack) -> Azurite:
    return local_stack.start_azurite()


@pytest.fixture(scope="module")
def models(azurite: Azurite) -> ContainerClient:
    """The `models` blob container in Azurite (created if missing)."""
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client("models")
    with contextlib.suppress(Exception):
        container.create_container()
    return container


@pytest.fixture(scope="session")
def registry(local_stack: Stack, registry_notify_port: int, registry_notify_token: str) -> Registry:
    return local_stack.start_registry(
        notify_url=f"http://127.0.0.1:{registry_notify_port}/webhooks/registry",
        notify_token=registry_notify_token,
    )


@pytest.fixture(scope="session")
def kube(local_stack: Stack) -> KubeCluster:
    return local_stack.start_kube()


@pytest.fixture(scope="session")
def prometheus(local_stack: Stack) -> Prometheus:
    """Debian's prometheus on the stack's host address; tests hand it targets with `scrape`."""
    return local_stack.start_prometheus()
