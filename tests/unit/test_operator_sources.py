"""Which storage accounts, containers and registries a namespace's ModelApps may name (plan/sources.py), how the
platform admin says so (config.py), and that a refused host gets no request (reconcile/resolve.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from modelapp_operator.api.modelapp_types import BlobLocation, parse_modelapp
from modelapp_operator.clients.blob_storage import BlobCredential, BlobProperties
from modelapp_operator.clients.registry import RegistryCredentials
from modelapp_operator.config import ConfigError, OperatorConfig, allowed_sources
from modelapp_operator.names import Reason
from modelapp_operator.plan.sources import (
    AllowedSources,
    HostPattern,
    SourceRules,
    StorageRule,
    parse_namespace_rules,
    registry_refusal,
    storage_refusal,
)
from modelapp_operator.reconcile.resolve import resolve_image, resolve_model

from tests.unit.fake_kube import FakeKube

pytestmark = pytest.mark.unit

DEFAULTS = AllowedSources()


@pytest.mark.parametrize(
    ("account_url", "allowed"),
    [
        ("https://acct.blob.core.windows.net", True),
        ("https://ACCT.blob.core.windows.net/", True),
        ("https://acct.blob.core.windows.net:443", True),
        ("https://acct.blob.core.windows.net:8443", False),  # another port: another service
        ("https://a.b.blob.core.windows.net", False),  # '*' is one label
        ("https://blob.core.windows.net", False),
        ("https://acct.blob.core.windows.net.evil.example", False),
        ("https://evilblob.core.windows.net", False),
        ("https://127.0.0.1:10000/devstoreaccount1", False),
        ("https://management.azure.com", False),
    ],
)
def test_storage_defaults_allow_azure_accounts_only(account_url: str, allowed: bool) -> None:
    assert (storage_refusal(DEFAULTS, "team-a", account_url, "models") is None) is allowed


@pytest.mark.parametrize(
    ("registry", "allowed"),
    [
        ("team.azurecr.io", True),
        ("team.azurecr.io:443", True),
        ("team.azurecr.io:5000", False),
        ("azurecr.io", False),
        ("a.team.azurecr.io", False),
        ("team.azurecr.io.evil.example", False),
        ("127.0.0.1:5000", False),
        ("docker.io", False),
    ],
)
def test_registry_defaults_allow_acr_only(registry: str, allowed: bool) -> None:
    assert (registry_refusal(DEFAULTS, "team-a", registry) is None) is allowed


def test_a_refusal_names_the_host_and_how_the_admin_allows_it() -> None:
    message = storage_refusal(DEFAULTS, "team-a", "https://127.0.0.1:8443/acct", "models")
    assert message is not None
    assert "127.0.0.1:8443" in message and "team-a" in message
    assert "MODELAPP_ALLOWED_STORAGE" in message and "MODELAPP_ALLOWED_SOURCES_FILE" in message
    message = registry_refusal(DEFAULTS, "team-a", "evil.example:5000")
    assert message is not None and "evil.example:5000" in message and "MODELAPP_ALLOWED_REGISTRIES" in message


@pytest.mark.parametrize("pattern", ["*", "*.com", "azurecr.*", "a*.azurecr.io", "x.io:0", "x.io:70000", "a b.io", ""])
def test_patterns_too_broad_or_malformed_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"pattern|broad|port"):
        HostPattern.parse(pattern)


def test_namespace_rules_extend_the_cluster_rules_for_that_namespace_only() -> None:
    sources = AllowedSources(
        namespaces=parse_namespace_rules(
            {
                "namespaces": {
                    "team-a": {"storage": ["teama.blob.core.windows.net/models"], "registries": ["127.0.0.1:5000"]},
                    "ml-*": {"storage": ["127.0.0.1:10000"]},
                }
            }
        )
    )
    assert registry_refusal(sources, "team-a", "127.0.0.1:5000") is None
    assert registry_refusal(sources, "team-b", "127.0.0.1:5000") is not None
    assert registry_refusal(sources, "team-b", "x.azurecr.io") is None  # the cluster's rules stay
    assert storage_refusal(sources, "ml-1", "http://127.0.0.1:10000/devstoreaccount1", "anything") is None
    assert storage_refusal(sources, "ml-1", "http://127.0.0.1:10001/devstoreaccount1", "anything") is not None


def test_containers_narrow_an_account() -> None:
    rules = SourceRules(storage=(StorageRule.parse("teama.blob.core.windows.net/models-*"),))
    sources = AllowedSources(everywhere=rules)
    assert storage_refusal(sources, "a", "https://teama.blob.core.windows.net", "models-prod") is None
    refused = storage_refusal(sources, "a", "https://teama.blob.core.windows.net", "secrets")
    assert refused is not None and "container secrets" in refused


def test_any_port_is_only_said_explicitly() -> None:
    rule = StorageRule.parse("127.0.0.1:*")
    assert rule.allows("127.0.0.1", 10000, 80, "c") and rule.allows("127.0.0.1", None, 80, "c")
    assert not StorageRule.parse("127.0.0.1").allows("127.0.0.1", 10000, 80, "c")


# --- the admin's configuration ----------------------------------------------------------------------------------


def test_config_defaults_are_azure_and_none_means_nothing() -> None:
    assert OperatorConfig.from_env({}).sources == DEFAULTS
    nothing = allowed_sources({"MODELAPP_ALLOWED_STORAGE": "none", "MODELAPP_ALLOWED_REGISTRIES": "NONE"})
    assert nothing.everywhere == SourceRules()
    assert registry_refusal(nothing, "a", "x.azurecr.io") is not None


def test_config_variables_replace_the_defaults() -> None:
    sources = allowed_sources(
        {
            "MODELAPP_ALLOWED_STORAGE": "127.0.0.1:10000, acct.blob.core.windows.net/models",
            "MODELAPP_ALLOWED_REGISTRIES": "127.0.0.1:5000",
        }
    )
    assert storage_refusal(sources, "a", "http://127.0.0.1:10000/devstoreaccount1", "c") is None
    assert storage_refusal(sources, "a", "https://other.blob.core.windows.net", "models") is not None
    assert registry_refusal(sources, "a", "x.azurecr.io") is not None


def test_config_file_adds_namespace_rules(tmp_path: Path) -> None:
    path = tmp_path / "sources.yaml"
    path.write_text("namespaces:\n  team-a:\n    registries: [team-a.example.io]\n")
    sources = allowed_sources({"MODELAPP_ALLOWED_SOURCES_FILE": str(path)})
    assert registry_refusal(sources, "team-a", "team-a.example.io") is None
    assert registry_refusal(sources, "team-b", "team-a.example.io") is not None


@pytest.mark.parametrize(
    ("env", "file", "match"),
    [
        ({"MODELAPP_ALLOWED_STORAGE": "*"}, None, "MODELAPP_ALLOWED_STORAGE"),
        ({"MODELAPP_ALLOWED_REGISTRIES": "*.io"}, None, "MODELAPP_ALLOWED_REGISTRIES"),
        ({}, "namespaces: [a]\n", "MODELAPP_ALLOWED_SOURCES_FILE"),
        ({}, "namespaces:\n  a:\n    storage: ['*']\n", "MODELAPP_ALLOWED_SOURCES_FILE"),
        ({}, "namespaces:\n  a:\n    images: [x.io]\n", "MODELAPP_ALLOWED_SOURCES_FILE"),
        ({}, "tenants: {}\n", "MODELAPP_ALLOWED_SOURCES_FILE"),
        ({}, "namespaces: {a: {registries: [x.io]\n", "MODELAPP_ALLOWED_SOURCES_FILE"),
    ],
)
def test_bad_configuration_stops_the_operator(
    tmp_path: Path, env: dict[str, str], file: str | None, match: str
) -> None:
    if file is not None:
        path = tmp_path / "sources.yaml"
        path.write_text(file)
        env = {**env, "MODELAPP_ALLOWED_SOURCES_FILE": str(path)}
    with pytest.raises(ConfigError, match=match):
        allowed_sources(env)


# --- the operator sends nothing to a refused host ---------------------------------------------------------------


class Recorder:
    """ImageResolver and ModelResolver that record being asked: a refused host must never be."""

    def __init__(self) -> None:
        self.asked: list[Any] = []

    async def resolve(self, repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        self.asked.append(repository)
        return "sha256:" + "a" * 64

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        self.asked.append(location.account_url)
        return BlobProperties(etag='"1"', size=1, last_modified=None, metadata={})


def _app(repository: str, account_url: str, *, secret: bool = False) -> Any:
    credentials: dict[str, Any] = {"secretRef": {"name": "storage"}} if secret else {"serviceAccountName": "app"}
    return parse_modelapp(
        {
            "apiVersion": "modelapp.io/v1alpha1",
            "kind": "ModelApp",
            "metadata": {"name": "iris", "namespace": "team-a", "uid": "u", "generation": 1},
            "spec": {
                "image": {"repository": repository, "tag": "v1"},
                "model": {
                    "blob": {"accountUrl": account_url, "container": "models", "name": "m.onnx"},
                    "credentials": credentials,
                },
            },
        }
    )


def test_refused_hosts_get_no_request() -> None:
    recorder = Recorder()
    app = _app("127.0.0.1:5000/apps/iris", "https://127.0.0.1:8443/acct")

    async def run() -> tuple[Any, Any]:
        image = await resolve_image(app, FakeKube(), recorder, DEFAULTS)
        model = await resolve_model(app, FakeKube(), recorder, None, DEFAULTS)
        return image, model

    (image, image_resolution), (model, model_resolution) = asyncio.run(run())
    assert image is None and model is None and recorder.asked == []
    assert image_resolution.condition.reason == Reason.REGISTRY_NOT_ALLOWED
    assert model_resolution.condition.reason == Reason.STORAGE_ACCOUNT_NOT_ALLOWED
    assert "127.0.0.1:8443" in model_resolution.condition.message
    assert image_resolution.retry_after is not None and image_resolution.retry_after >= 300


class SecretKube(FakeKube):
    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        connection = (
            "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=eA==;BlobEndpoint=https://127.0.0.1:8443/x;"
        )
        return {"connectionString": connection.encode()} if (namespace, name) == ("team-a", "storage") else None


def test_a_connection_string_naming_another_account_is_refused_too() -> None:
    """accountUrl is allowed, but the Secret's connection string sends the operator elsewhere."""
    recorder = Recorder()
    app = _app("team.azurecr.io/apps/iris", "https://acct.blob.core.windows.net", secret=True)
    kube = SecretKube()
    model, resolution = asyncio.run(resolve_model(app, kube, recorder, None, DEFAULTS))
    assert model is None and recorder.asked == []
    assert resolution.condition.reason == Reason.STORAGE_ACCOUNT_NOT_ALLOWED
    assert "AccountKey" not in resolution.condition.message and "eA==" not in resolution.condition.message
