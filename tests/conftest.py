"""Session fixtures that start the real local stack (deploy/local/modelapp_localstack).

Each component starts on first use and stops at the end of the session, so a
unit-only run starts nothing. Everything listens on loopback only.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.procs import free_port


@pytest.fixture(scope="session")
def local_stack() -> Iterator[Stack]:
    stack = Stack.create(keep_run_dir=os.environ.get("MODELAPP_KEEP_RUN_DIR") == "1")
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


@pytest.fixture(scope="session")
def registry(local_stack: Stack, registry_notify_port: int, registry_notify_token: str) -> Registry:
    return local_stack.start_registry(
        notify_url=f"http://127.0.0.1:{registry_notify_port}/webhooks/registry",
        notify_token=registry_notify_token,
    )


@pytest.fixture(scope="session")
def kube(local_stack: Stack) -> KubeCluster:
    return local_stack.start_kube()
