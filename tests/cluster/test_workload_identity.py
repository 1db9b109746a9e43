"""Workload identity, exercised (issue 21): no account key or connection string anywhere.

The real kube-apiserver issues service-account tokens (TokenRequest, audience api://AzureADTokenExchange);
azure-identity's workload identity credential trades them at the stack's Entra ID stand-in
(modelapp_localstack/entra.py) for bearer tokens, which a second Azurite in OAuth mode (HTTPS, issuer,
audience and lifetime checked) accepts. The publisher uploads the model, the operator (out of cluster,
`python -m modelapp_operator`) resolves and snapshots it, and the serving app (`python -m
modelapp_serving`, with the env the operator rendered plus what AKS's webhook injects) downloads,
verifies and serves it: each with its own service account's token file and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from azure.identity import WorkloadIdentityCredential
from cryptography.hazmat.primitives.asymmetric import rsa
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.entra import ASSERTION_AUDIENCE, EntraStandIn
from modelapp_localstack.operator import OperatorProcess
from modelapp_localstack.procs import free_port
from modelapp_serving.publish import PublishedModel, publish_model
from modelapp_serving.sample_model import write_sample_models

from tests.cluster.helpers import App, StartOperator, apply, env_of, get, wait_ready

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = f"wi-{uuid.uuid4().hex[:6]}"
STORAGE_SCOPE = "https://storage.azure.com/.default"
SETOSA = [5.1, 3.5, 1.4, 0.2]
# Names that would carry a storage key; none may reach a process of this test.
KEY_VARIABLES = ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "MODELAPP_MODEL_CONNECTION_STRING")


@dataclass(frozen=True)
class Identity:
    service_account: str
    client_id: str
    token_file: Path
    namespace: str = NAMESPACE

    @property
    def subject(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@pytest.fixture(scope="module")
def entra(local_stack: Stack, kube: KubeCluster) -> EntraStandIn:
    return local_stack.start_entra()


@pytest.fixture(scope="module")
def oauth_azurite(local_stack: Stack) -> Azurite:
    return local_stack.start_azurite_oauth()


@pytest.fixture(scope="module")
def namespace(kube: KubeCluster) -> Iterator[str]:
    kube.kubectl("create", "namespace", NAMESPACE)
    yield NAMESPACE
    kube.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def service_account_token(
    kube: KubeCluster, name: str, audience: str = ASSERTION_AUDIENCE, namespace: str = NAMESPACE
) -> str:
    """A token the API server issues (TokenRequest), as the kubelet does for a projected volume."""
    return kube.kubectl(
        "create", "token", name, "-n", namespace, "--audience", audience, "--duration", "10m"
    ).stdout.strip()


def issuer_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["iss"])


def make_identity(
    kube: KubeCluster,
    entra: EntraStandIn,
    folder: Path,
    name: str,
    *,
    federated: bool = True,
    namespace: str = NAMESPACE,
) -> Identity:
    """A service account and its token file; with `federated`, a managed identity trusting it (what
    `az identity federated-credential create --issuer <cluster issuer> --subject <sa>` records)."""
    kube.kubectl("create", "serviceaccount", name, "-n", namespace)
    token = service_account_token(kube, name, namespace=namespace)
    token_file = folder / f"{name}.token"
    token_file.write_text(token)
    identity = Identity(name, str(uuid.uuid4()), token_file, namespace)
    if federated:
        entra.authority.add_federated_credential(identity.client_id, issuer_of(token), identity.subject)
    return identity


def credential_of(entra: EntraStandIn, identity: Identity) -> WorkloadIdentityCredential:
    """azure-identity's own credential, as the operator and the app use it (there through DefaultAzureCredential)."""
    return WorkloadIdentityCredential(
        tenant_id=entra.tenant_id,
        client_id=identity.client_id,
        token_file_path=str(identity.token_file),
        authority=entra.authority_host,
    )


def publish_sample(
    entra: EntraStandIn, publisher: Identity, url: str, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> PublishedModel:
    """The data scientist's publish of the sample model, with the publisher's own identity."""
    for name, value in tls_env(entra).items():
        monkeypatch.setenv(name, value)
    write_sample_models(folder)
    with credential_of(entra, publisher) as credential:
        return publish_model(folder / "iris.onnx", url, credential=credential, progress=False)


def tls_env(entra: EntraStandIn) -> dict[str, str]:
    """Trust the stack's CA (the stand-in's and Azurite's certificates): aiohttp reads SSL_CERT_FILE, requests
    REQUESTS_CA_BUNDLE."""
    return {"SSL_CERT_FILE": str(entra.ca_file), "REQUESTS_CA_BUNDLE": str(entra.ca_file)}


def keyless_environ() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in KEY_VARIABLES}


def post_token(entra: EntraStandIn, form: dict[str, str], tenant: str | None = None) -> tuple[int, dict[str, Any]]:
    """A raw client-credentials request to the stand-in, as azure-identity sends it."""
    url = f"{entra.authority_host}/{tenant or entra.tenant_id}/oauth2/v2.0/token"
    data = urllib.parse.urlencode(form).encode()
    context = ssl.create_default_context(cafile=str(entra.ca_file))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def assertion_form(identity: Identity, assertion: str, scope: str = STORAGE_SCOPE) -> dict[str, str]:
    return {
        "client_id": identity.client_id,
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }


def test_the_stand_in_checks_what_entra_checks_for_a_federated_credential(
    kube: KubeCluster, entra: EntraStandIn, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted = make_identity(kube, entra, tmp_path, "trusted")
    stranger = make_identity(kube, entra, tmp_path, "stranger", federated=False)
    assertion = trusted.token_file.read_text()

    for name, value in tls_env(entra).items():
        monkeypatch.setenv(name, value)
    credential = credential_of(entra, trusted)
    with credential:
        token = credential.get_token(STORAGE_SCOPE).token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == f"https://sts.windows.net/{entra.tenant_id}/"
    assert claims["aud"] == "https://storage.azure.com"
    assert claims["appid"] == trusted.client_id
    assert claims["nbf"] <= time.time() < claims["exp"]

    def refused(form: dict[str, str], tenant: str | None = None) -> str:
        status, body = post_token(entra, form, tenant)
        assert status in (400, 401), body
        return str(body["error_description"])

    # Another service account's token, for the trusted client ID: the subject does not match.
    assert refused(assertion_form(trusted, stranger.token_file.read_text())).startswith("AADSTS700213")
    # The trusted service account's token with another audience (a token meant for something else).
    other_audience = service_account_token(kube, "trusted", audience="https://kubernetes.default.svc")
    assert refused(assertion_form(trusted, other_audience)).startswith("AADSTS700212")
    # A forged signature: the same header and claims signed by a key the API server never had.
    header, payload, _ = assertion.split(".")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims_in = jwt.decode(assertion, options={"verify_signature": False})
    forged = jwt.encode(claims_in, other_key, "RS256", headers=jwt.get_unverified_header(assertion))
    assert refused(assertion_form(trusted, forged)).startswith("AADSTS700027")
    assert refused(assertion_form(trusted, f"{header}.{payload}.{forged.split('.')[2]}")).startswith("AADSTS700027")
    # An unknown application, a scope for another resource, another tenant.
    unknown = Identity("trusted", str(uuid.uuid4()), trusted.token_file)
    assert refused(assertion_form(unknown, assertion)).startswith("AADSTS700016")
    assert refused(assertion_form(trusted, assertion, "https://vault.azure.net/.default")).startswith("AADSTS500011")
    assert refused(assertion_form(trusted, assertion), tenant=str(uuid.uuid4())).startswith("AADSTS90002")


@pytest.fixture(scope="module")
def operator_identity(
    kube: KubeCluster, entra: EntraStandIn, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Identity:
    return make_identity(kube, entra, tmp_path_factory.mktemp("operator-identity"), "modelapp-operator")


@pytest.fixture(scope="module")
def operator(
    start_operator: StartOperator, entra: EntraStandIn, operator_identity: Identity, namespace: str
) -> OperatorProcess:
    env = {
        **entra.workload_identity_env(operator_identity.client_id, operator_identity.token_file),
        **tls_env(entra),
        "MODELAPP_POLL_INTERVAL_SECONDS": "1",
        "MODELAPP_RECEIVER_ENABLED": "false",
    }
    assert not set(KEY_VARIABLES) & set(os.environ), "a storage key in the test's environment"
    return start_operator(namespace, env)


def start_app(env: dict[str, str], folder: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log_path = folder / "serve.log"
    (folder / "prometheus").mkdir()
    full_env = {
        **keyless_environ(),
        **env,
        "PYTHONPATH": str(REPO_ROOT / "app") + os.pathsep + str(REPO_ROOT / "contract"),
        "MODELAPP_PORT": str(port),
        "MODELAPP_LIVENESS_PORT": str(free_port()),
        "MODELAPP_WORKERS": "1",
        "MODELAPP_MODEL_CACHE_DIR": str(folder / "cache"),
        "PROMETHEUS_MULTIPROC_DIR": str(folder / "prometheus"),
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelapp_serving", "--", "--bind", f"127.0.0.1:{port}"],
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}", log_path


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def test_model_is_published_resolved_snapshotted_and_served_with_bearer_tokens_only(
    kube: KubeCluster,
    registry: Registry,
    entra: EntraStandIn,
    oauth_azurite: Azurite,
    namespace: str,
    operator_identity: Identity,
    operator: OperatorProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert oauth_azurite.blob_endpoint.startswith("https://") and not oauth_azurite.account_key
    publisher = make_identity(kube, entra, tmp_path, "publisher")
    app_identity = make_identity(kube, entra, tmp_path, "iris")

    published = publish_sample(
        entra, publisher, f"{oauth_azurite.blob_endpoint}/models/{namespace}/iris.onnx", tmp_path, monkeypatch
    )

    # The operator resolves the blob and snapshots it with its own identity.
    repository = f"{registry.host}/apps/{namespace}"
    digest = registry.push_random_image(f"apps/{namespace}", "stable")
    app = App(namespace, "iris", repository, digest, f"{namespace}/iris.onnx", published.sha256, published.etag)
    body = {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": app.name, "namespace": namespace},
        "spec": {
            "image": {"repository": repository, "digest": digest},
            "model": {
                "blob": {"accountUrl": oauth_azurite.blob_endpoint, "container": "models", "name": app.blob_name},
                "credentials": {"serviceAccountName": app_identity.service_account, "clientId": app_identity.client_id},
            },
            "replicas": 1,
        },
    }
    apply(kube, body)
    status = wait_ready(kube, app, operator)["status"]["model"]
    assert status["version"] == published.etag and status["sha256"] == published.sha256
    assert status["snapshot"], status

    # What the operator rendered for the pods: their own identity, no key.
    deployment = get(kube, "deployment", app)
    assert deployment is not None
    template = deployment["spec"]["template"]
    rendered = env_of(deployment)
    assert template["spec"]["serviceAccountName"] == app_identity.service_account
    assert template["metadata"]["labels"].get("azure.workload.identity/use") == "true"
    assert rendered["AZURE_CLIENT_ID"] == app_identity.client_id
    assert not set(KEY_VARIABLES) & set(rendered)
    assert rendered["MODELAPP_MODEL_PIN"] == f"snapshot={status['snapshot'].replace(':', '%3A')}"

    # The app, with that env plus what AKS's webhook injects (authority, tenant, token file).
    env = {name: value for name, value in rendered.items() if isinstance(value, str)}
    env.update(entra.workload_identity_env(app_identity.client_id, app_identity.token_file))
    env.update(tls_env(entra))
    process, base_url, log_path = start_app(env, tmp_path)
    try:
        deadline = time.monotonic() + 90
        while http(f"{base_url}/readyz")[0] != 200:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        status_code, answer = http(f"{base_url}/predict", {"instances": [SETOSA]})
        assert status_code == 200, answer
        assert json.loads(answer)["predictions"] == [0], answer
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # Every token came from the stand-in, each for its own service account.
    issued = {(token.client_id, token.subject) for token in entra.authority.issued}
    for identity in (publisher, operator_identity, app_identity):
        assert (identity.client_id, identity.subject) in issued
    assert {token.resource for token in entra.authority.issued} == {"https://storage.azure.com"}
