"""The cluster tier's one way to run the operator for a test module (each module passes its own options)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import pytest
from modelapp_localstack import KubeCluster, Registry
from modelapp_localstack.operator import OperatorProcess

from tests.cluster.helpers import StartOperator, operator_running


@pytest.fixture(scope="module")
def start_operator(
    kube: KubeCluster, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartOperator]:
    """Starts operators for this module (each logging to a file of its own); all are stopped, and their
    logs checked, when the module's tests are done."""
    with contextlib.ExitStack() as running:

        def start(
            namespaces: str, env: Mapping[str, str] | None = None, *, secrets: Sequence[str] = ()
        ) -> OperatorProcess:
            log_file = tmp_path_factory.mktemp("operator") / "operator.log"
            return running.enter_context(operator_running(kube, registry, log_file, namespaces, env, secrets))

        yield start
