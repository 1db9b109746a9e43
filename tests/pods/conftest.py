"""Fixtures for tests that run real containers: the stack's real node, the app and operator images
built from the project's Dockerfiles, the operator installed in-cluster from deploy/, and the
tenant namespace `ml` (deploy/tenant) with its Secrets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.incluster import TENANT_NAMESPACE, InClusterOperator, install_operator
from modelapp_localstack.operator import tenant_secrets

APP_REPOSITORY = "modelapp/iris-server"
OPERATOR_REPOSITORY = "modelapp/operator"
POLL_SECONDS = 2


@dataclass(frozen=True)
class Image:
    repository: str  # host/path, no tag
    tag: str
    digest: str

    @property
    def by_digest(self) -> str:
        return f"{self.repository}@{self.digest}"


@pytest.fixture(scope="session")
def real_stack(local_stack: Stack, kube: KubeCluster) -> Stack:
    assert local_stack.node is not None, "the session stack has no real node (conftest decides from the markers)"
    return local_stack


def _build(stack: Stack, registry: Registry, which: Literal["app", "operator"], repository: str, tag: str) -> Image:
    from modelapp_localstack import images

    reference = images.build_project_image(stack.buildah(), which, registry, repository=repository, tag=tag)
    name, digest = reference.split("@", 1)
    return Image(name, tag, digest)


@pytest.fixture(scope="session")
def app_image(real_stack: Stack, registry: Registry) -> Image:
    """Dockerfile.app, built on the Debian base image and pushed as `modelapp/iris-server:v1`."""
    return _build(real_stack, registry, "app", APP_REPOSITORY, "v1")


@pytest.fixture(scope="session")
def operator_image(real_stack: Stack, registry: Registry) -> Image:
    return _build(real_stack, registry, "operator", OPERATOR_REPOSITORY, "test")


@pytest.fixture(scope="session")
def incluster_operator(
    real_stack: Stack, kube: KubeCluster, registry: Registry, azurite: Azurite, operator_image: Image,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InClusterOperator]:
    operator = install_operator(
        kube, registry, operator_image.by_digest, tmp_path_factory.mktemp("incluster"),
        settings={"MODELAPP_POLL_INTERVAL_SECONDS": str(POLL_SECONDS), "MODELAPP_LOG_FORMAT": "text"},
    )
    items = tenant_secrets(TENANT_NAMESPACE, registry, azurite)
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    yield operator
    logs = operator.logs(tail=400)
    operator.uninstall()
    assert "Traceback" not in logs, logs


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1: the sample LogisticRegression; v2: a one-split tree whose answers differ visibly."""
    from modelapp_localstack.demo import train_model

    folder = tmp_path_factory.mktemp("models")
    return {"v1": train_model(folder / "v1", 1), "v2": train_model(folder / "v2", 2)}
