"""Tenant boundaries, attacked (issue 22): the operator's identity goes only where a platform admin allowed, a
401 challenge for another resource gets no token, and an endless manifest does not grow the operator.

Each test runs `python -m modelapp_operator` as in production against the stack's real API server, with its
Azure identity a managed-identity endpoint standing in on loopback (App Service's protocol:
IDENTITY_ENDPOINT + IDENTITY_HEADER, which azure-identity's DefaultAzureCredential picks up), and a tenant's
ModelApp naming hosts of the tenant's choosing: https servers on loopback with certificates from the stack's
CA, so the operator would trust them. Every request they receive is recorded.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.operator import OperatorProcess
from modelapp_operator.config import MANIFEST_MAX_BYTES
from modelapp_operator.names import Reason

from tests.cluster.helpers import App, StartOperator, apply, conditions, get, modelapp, prepare, wait_for

pytestmark = pytest.mark.cluster

IDENTITY_HEADER = "stand-in-identity-header"
STORAGE_RESOURCE = "https://storage.azure.com"
MANAGEMENT_RESOURCE = "https://management.azure.com"
# Every variable that would give DefaultAzureCredential another identity than the stand-in's: unset.
OTHER_IDENTITIES = (
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_USERNAME",
    "MSI_ENDPOINT",
    "IMDS_ENDPOINT",
    "IDENTITY_SERVER_THUMBPRINT",
)
# How much the operator's peak RSS may grow while it reads an endless manifest: the cap (4 MiB), what is in
# flight, and Python's allocator. Without a cap it grows with every byte the registry sends.
RSS_GROWTH_LIMIT_BYTES = 32 * 1024 * 1024


@dataclass
class Seen:
    """What a stand-in server received."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    sent_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append({"method": handler.command, "path": handler.path, "headers": dict(handler.headers)})

    def authorizations(self) -> list[str]:
        with self.lock:
            return [r["headers"].get("Authorization", "") for r in self.requests]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    seen: Seen


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler], stack: Stack | None, name: str) -> Iterator[_Server]:
    """A threaded server on loopback, https with a certificate from the stack's CA when `stack` is given."""
    server = _Server(("127.0.0.1", 0), handler)
    server.seen = Seen()
    if stack is not None:
        pair = stack.ca.issue(f"tenant-{name}", f"tenant-{name}", ip_addresses=("127.0.0.1",), server=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name=f"stand-in-{name}", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def host_of(server: _Server) -> str:
    return f"127.0.0.1:{server.server_address[1]}"


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return


class ManagedIdentityStandIn(_Quiet):
    """App Service's managed-identity endpoint: a token for whichever resource is asked, naming it."""

    def do_GET(self) -> None:
        self.server.seen.add(self)
        resource = parse_qs(urlsplit(self.path).query).get("resource", [""])[0]
        if self.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
            self._answer(401, {"error": "bad identity header"})
            return
        token = {
            "access_token": f"operator-token-for-{resource}",
            "expires_on": int(time.time()) + 3600,
            "resource": resource,
            "token_type": "Bearer",
        }
        self._answer(200, token)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class StorageAttacker(_Quiet):
    """A tenant's host posing as a storage account: records everything, answers 403."""

    def _any(self) -> None:
        self.server.seen.add(self)
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = _any


class ChallengeForManagement(_Quiet):
    """An allowed account gone bad: every request gets a 401 challenge naming Azure Resource Manager."""

    def _any(self) -> None:
        self.server.seen.add(self)
        self.send_response(401)
        self.send_header(
            "WWW-Authenticate",
            "Bearer authorization_uri=https://login.microsoftonline.com/00000000-0000-0000-0000-000000000001"
            f"/oauth2/authorize resource_id={MANAGEMENT_RESOURCE}",
        )
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = _any


class EndlessManifest(_Quiet):
    """A registry whose manifest never ends: HEAD says 200 without a digest, GET streams until the client
    hangs up (at most 2 GiB, so a broken client cannot keep the test running for ever)."""

    def do_HEAD(self) -> None:
        self.server.seen.add(self)
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.server.seen.add(self)
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b'{"layers": [' + b" " * (256 * 1024)
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        try:
            while self.server.seen.sent_bytes < 2 * 1024**3:
                self.wfile.write(framed)
                with self.server.seen.lock:
                    self.server.seen.sent_bytes += len(chunk)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return


def identity_env(identity: _Server, stack: Stack) -> dict[str, str]:
    return {
        "IDENTITY_ENDPOINT": f"http://{host_of(identity)}/msi/token",
        "IDENTITY_HEADER": IDENTITY_HEADER,
        # The tenant's servers have certificates from the stack's CA: the operator would trust them.
        "SSL_CERT_FILE": str(stack.ca.cert_path),
        "MODELAPP_WATCH_ERROR_TTL_SECONDS": "1",
    }


def account_host(azurite: Azurite) -> str:
    return urlsplit(azurite.blob_endpoint).netloc


def with_identity(body: dict[str, Any], account_url: str) -> dict[str, Any]:
    """The ModelApp's model read with the operator's own identity (no Secret), from `account_url`."""
    body["spec"]["model"]["blob"]["accountUrl"] = account_url
    body["spec"]["model"]["credentials"] = {"serviceAccountName": "default"}
    return body


def model_condition(kube: KubeCluster, app: App, operator: OperatorProcess, reason: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        found = conditions(get(kube, "modelapp", app) or {}).get("ModelResolved") or {}
        return found if found.get("reason") == reason else None

    return wait_for(f"ModelResolved reason {reason}", reached, operator)


@pytest.fixture
def identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    """The operator's identity: the stand-in only (the operator inherits this process's environment)."""
    for name in OTHER_IDENTITIES:
        monkeypatch.delenv(name, raising=False)
    with serving(ManagedIdentityStandIn, None, "identity") as server:
        yield server


def operator_allowing(
    start_operator: StartOperator, identity: _Server, stack: Stack, prefix: str, *, registries: str, storage: str
) -> OperatorProcess:
    """An operator with the stand-in as its identity that may use exactly these registries and accounts."""
    env = {
        **identity_env(identity, stack),
        "MODELAPP_ALLOWED_REGISTRIES": registries,
        "MODELAPP_ALLOWED_STORAGE": storage,
    }
    return start_operator(f"{prefix}-*", env)


def test_a_host_outside_the_allow_list_gets_no_request_and_no_token(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    local_stack: Stack,
    start_operator: StartOperator,
    identity: _Server,
) -> None:
    prefix = f"tb-deny-{uuid.uuid4().hex[:4]}"
    with serving(StorageAttacker, local_stack, "attacker") as attacker:
        operator = operator_allowing(
            start_operator, identity, local_stack, prefix, registries=registry.host, storage=account_host(azurite)
        )
        app = prepare(kube, registry, azurite, models, prefix=prefix)
        apply(kube, with_identity(modelapp(app, azurite), f"https://{host_of(attacker)}/victim"))
        found = model_condition(kube, app, operator, Reason.STORAGE_ACCOUNT_NOT_ALLOWED)
        assert found["status"] == "False"
        assert host_of(attacker) in found["message"] and "MODELAPP_ALLOWED_STORAGE" in found["message"]
        # The image side went on: the allow-list is per host, not a stop for the whole app.
        image = wait_for("ImageResolved", lambda: conditions(get(kube, "modelapp", app) or {}).get("ImageResolved"),
                         operator)  # fmt: skip
        assert image["status"] == "True", image
        time.sleep(3)  # a poll or retry would have gone out by now
        assert attacker.seen.requests == [], "the tenant's host received a request"
        assert identity.seen.requests == [], "the operator fetched a token for nothing"
        assert "operator-token-for" not in operator.log_text()


def test_a_challenge_for_another_resource_gets_no_token(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    local_stack: Stack,
    start_operator: StartOperator,
    identity: _Server,
) -> None:
    prefix = f"tb-chal-{uuid.uuid4().hex[:4]}"
    with serving(ChallengeForManagement, local_stack, "challenger") as challenger:
        storage = f"{account_host(azurite)},{host_of(challenger)}"
        operator = operator_allowing(
            start_operator, identity, local_stack, prefix, registries=registry.host, storage=storage
        )
        app = prepare(kube, registry, azurite, models, prefix=prefix)
        apply(kube, with_identity(modelapp(app, azurite), f"https://{host_of(challenger)}/acct"))
        found = model_condition(kube, app, operator, Reason.TOKEN_SCOPE_NOT_ALLOWED)
        assert MANAGEMENT_RESOURCE in found["message"], found
        asked = [parse_qs(urlsplit(r["path"]).query).get("resource", [""])[0] for r in identity.seen.requests]
        assert asked and set(asked) == {STORAGE_RESOURCE}, f"tokens were asked for {asked}"
        sent = set(challenger.seen.authorizations())
        assert sent == {f"Bearer operator-token-for-{STORAGE_RESOURCE}"}, sent
        assert f"operator-token-for-{MANAGEMENT_RESOURCE}" not in operator.log_text()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_an_endless_manifest_does_not_grow_the_operator(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    local_stack: Stack,
    start_operator: StartOperator,
    identity: _Server,
) -> None:
    prefix = f"tb-big-{uuid.uuid4().hex[:4]}"
    with serving(EndlessManifest, local_stack, "endless") as endless:
        registries = f"{registry.host},{host_of(endless)}"
        operator = operator_allowing(
            start_operator, identity, local_stack, prefix, registries=registries, storage=account_host(azurite)
        )
        app = prepare(kube, registry, azurite, models, prefix=prefix)
        # A first ModelApp warms the operator up (its first blob and registry calls load what they use), so
        # what grows afterwards is the endless manifest's doing.
        apply(kube, modelapp(app, azurite))
        wait_for("ModelResolved", lambda: (conditions(get(kube, "modelapp", app) or {}).get("ModelResolved") or {})
                 .get("status") == "True", operator)  # fmt: skip
        endless_app = App(app.namespace, "endless", "", "", app.blob_name, app.model_sha256, app.model_etag)
        body = modelapp(endless_app, azurite)
        body["spec"]["image"] = {"repository": f"{host_of(endless)}/apps/endless", "tag": "v1"}
        time.sleep(2)
        Path(f"/proc/{operator.pid}/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current
        before = _peak_rss(operator.pid)
        apply(kube, body)

        def too_large() -> dict[str, Any] | None:
            found = conditions(get(kube, "modelapp", endless_app) or {}).get("ImageResolved") or {}
            return found if found.get("reason") == Reason.REGISTRY_RESPONSE_TOO_LARGE else None

        found = wait_for("ImageResolved RegistryResponseTooLarge", too_large, operator)
        time.sleep(2)  # a retry or two (the error is cached for 1 s) read the stream again
        growth = _peak_rss(operator.pid) - before
        sent = endless.seen.sent_bytes
        requests = len(endless.seen.requests)
        print(f"\nendless manifest: the registry sent {sent / 2**20:.1f} MiB in {requests} requests; the operator's "
              f"peak RSS grew {growth / 2**20:.1f} MiB (cap {MANIFEST_MAX_BYTES / 2**20:.0f} MiB)")  # fmt: skip
        assert str(MANIFEST_MAX_BYTES) in found["message"], found
        assert growth < RSS_GROWTH_LIMIT_BYTES, f"the operator grew {growth} bytes"
        operator.check_alive()
