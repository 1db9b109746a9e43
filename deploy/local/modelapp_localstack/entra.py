"""A stand-in for Entra ID's token endpoint, for the local stack only: workload identity without Azure.

azure-identity's WorkloadIdentityCredential posts the projected Kubernetes service-account token as a
client assertion to `{AZURE_AUTHORITY_HOST}/{AZURE_TENANT_ID}/oauth2/v2.0/token` (client credentials
grant). This server answers there the way Entra ID answers for a federated identity credential, and
checks what Entra checks before it issues an access token:

- the tenant in the path is the stand-in's tenant (else AADSTS90002);
- `grant_type=client_credentials` and `client_assertion_type` is the JWT bearer type;
- the assertion's signature verifies against the issuer's keys (the API server's service-account
  signing keys, read from its OpenID discovery document and JWKS), with RS256/ES256 only (AADSTS700027);
- its `exp`/`nbf` hold now, with no leeway (AADSTS700024);
- `client_id` names an application with federated credentials here (AADSTS700016), one of which has
  the assertion's `iss` (AADSTS700211), its `sub` `system:serviceaccount:<ns>:<sa>` (AADSTS700213) and
  an audience in its `aud` (`api://AzureADTokenExchange`; AADSTS700212);
- the scope is `<resource>/.default` for a resource it issues tokens for (AADSTS70011).

It then issues a v1 access token for that resource (`aud` the resource, `iss`
`https://sts.windows.net/<tenant>/`, `appid` the client ID, `iat`/`nbf`/`exp`), signed with a key of its
own. Azurite's OAuth mode (`--oauth basic`) checks exactly issuer, audience and lifetime of it.

For pods, `workload_identity_policy` stands in for AKS's workload identity webhook with a
MutatingAdmissionPolicy (projected token volume and the AZURE_* variables it injects).

It has no users, no secrets, no role assignments and no instance discovery: do not use it anywhere but
the local stack. It listens on the stack's address with TLS from the stack's own CA; it runs as a thread
of the stack's process, so it ends with the stack.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .pki import CertificateAuthority
from .procs import log

ASSERTION_AUDIENCE = "api://AzureADTokenExchange"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
STORAGE_RESOURCE = "https://storage.azure.com"
_ASSERTION_ALGORITHMS = ["RS256", "ES256"]
DEFAULT_LIFETIME_SECONDS = 3600


@dataclass(frozen=True)
class FederatedCredential:
    """What `az identity federated-credential create` records: this issuer and subject may act as client_id."""

    client_id: str
    issuer: str
    subject: str
    audiences: tuple[str, ...] = (ASSERTION_AUDIENCE,)


@dataclass(frozen=True)
class IssuedToken:
    client_id: str
    subject: str
    resource: str
    expires_on: int


class TokenRefused(Exception):
    def __init__(self, error: str, code: int, description: str, status: int = 400) -> None:
        super().__init__(f"AADSTS{code}: {description}")
        self.error = error
        self.code = code
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "error_description": str(self), "error_codes": [self.code]}


def _no_record(what: str, value: str, code: int) -> TokenRefused:
    """Entra's refusal when no federated credential of the application matches the assertion's `what`."""
    return TokenRefused(
        "invalid_client",
        code,
        f"No matching federated identity record found for presented assertion {what} '{value}'.",
        401,
    )


@dataclass
class TokenAuthority:
    """The checks and the token, without HTTP. `issuer_keys(issuer)` returns that issuer's JWKS (a dict
    with `keys`); it is asked again when an assertion names a key ID it has not seen."""

    tenant_id: str
    issuer_keys: Callable[[str], Mapping[str, Any]]
    resources: tuple[str, ...] = (STORAGE_RESOURCE,)
    lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS
    federated: list[FederatedCredential] = field(default_factory=list)
    issued: list[IssuedToken] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    _keys: dict[tuple[str, str], jwt.PyJWK] = field(default_factory=dict, repr=False)
    _signing_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def token_issuer(self) -> str:
        return f"https://sts.windows.net/{self.tenant_id}/"

    def add_federated_credential(self, client_id: str, issuer: str, subject: str) -> FederatedCredential:
        credential = FederatedCredential(client_id, issuer, subject)
        with self._lock:
            self.federated.append(credential)
        return credential

    def token(self, tenant: str, form: Mapping[str, str]) -> dict[str, Any]:
        """The token endpoint's answer to a client-credentials request; raises TokenRefused."""
        try:
            return self._token(tenant, form)
        except TokenRefused as refusal:
            with self._lock:
                self.refused.append(str(refusal))
            raise

    def _token(self, tenant: str, form: Mapping[str, str]) -> dict[str, Any]:
        if tenant != self.tenant_id:
            raise TokenRefused("invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            raise TokenRefused("unsupported_grant_type", 70003, "Only client_credentials is supported here.")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            raise TokenRefused("invalid_request", 90014, "client_assertion of type jwt-bearer is required.")
        client_id = form.get("client_id", "")
        scope = form.get("scope", "")
        claims = self._verified_assertion(form["client_assertion"])
        self._match_federated_credential(client_id, claims)
        resource = self._resource(scope)
        now = int(time.time())
        expires_on = now + self.lifetime_seconds
        object_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant_id}/{client_id}"))
        access_token = jwt.encode(
            {
                "aud": resource,
                "iss": self.token_issuer,
                "iat": now,
                "nbf": now,
                "exp": expires_on,
                "appid": client_id,
                "appidacr": "2",
                "idtyp": "app",
                "oid": object_id,
                "sub": object_id,
                "tid": self.tenant_id,
                "ver": "1.0",
            },
            self._signing_key,
            algorithm="RS256",
            headers={"kid": "modelapp-entra-stand-in"},
        )
        with self._lock:
            self.issued.append(IssuedToken(client_id, str(claims["sub"]), resource, expires_on))
        return {
            "token_type": "Bearer",
            "expires_in": self.lifetime_seconds,
            "ext_expires_in": self.lifetime_seconds,
            "access_token": access_token,
        }

    def _verified_assertion(self, assertion: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as error:
            raise TokenRefused("invalid_client", 50027, f"JWT token is invalid or malformed: {error}") from None
        issuer = str(unverified.get("iss", ""))
        if not any(credential.issuer == issuer for credential in self.federated):
            raise _no_record("issuer", issuer, 700211)
        key = self._key(issuer, str(header.get("kid", "")))
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                key.key,
                algorithms=_ASSERTION_ALGORITHMS,
                issuer=issuer,
                options={"verify_aud": False, "require": ["iss", "sub", "aud", "exp", "iat"]},
                leeway=0,
            )
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError) as error:
            raise TokenRefused(
                "invalid_client", 700024, f"Client assertion is not within its valid time range: {error}", 401
            ) from None
        except jwt.PyJWTError as error:
            raise TokenRefused(
                "invalid_client", 700027, f"Client assertion failed signature validation: {error}", 401
            ) from None
        return claims

    def _key(self, issuer: str, kid: str) -> jwt.PyJWK:
        with self._lock:
            known = self._keys.get((issuer, kid))
        if known is not None:
            return known
        try:
            fetched = jwt.PyJWKSet.from_dict(dict(self.issuer_keys(issuer)))
        except Exception as error:
            raise TokenRefused("invalid_client", 700027, f"The issuer's keys could not be read: {error}", 401) from None
        with self._lock:
            for item in fetched.keys:
                if item.key_id is not None:
                    self._keys[(issuer, item.key_id)] = item
            known = self._keys.get((issuer, kid))
        if known is None:
            raise TokenRefused(
                "invalid_client", 700027, f"Client assertion failed signature validation: no key '{kid}'.", 401
            )
        return known

    def _match_federated_credential(self, client_id: str, claims: Mapping[str, Any]) -> None:
        records = [credential for credential in self.federated if credential.client_id == client_id]
        if not records:
            raise TokenRefused(
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{self.tenant_id}'.",
                400,
            )
        issuer, subject = claims["iss"], claims["sub"]
        records = [credential for credential in records if credential.issuer == issuer]
        if not records:
            raise _no_record("issuer", issuer, 700211)
        records = [credential for credential in records if credential.subject == subject]
        if not records:
            raise _no_record("subject", subject, 700213)
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if not any(audience in record.audiences for record in records for audience in audiences):
            raise _no_record("audience", " ".join(map(str, audiences)), 700212)

    def _resource(self, scope: str) -> str:
        scopes = scope.split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise TokenRefused("invalid_scope", 70011, f"The provided value for scope '{scope}' is not valid.")
        resource = scopes[0].removesuffix("/.default")
        if resource.rstrip("/") not in self.resources:
            raise TokenRefused("invalid_scope", 500011, f"The resource principal named {resource} was not found.")
        return resource.rstrip("/")


def _handler(authority: TokenAuthority) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            parts = self.path.split("?", 1)[0].strip("/").split("/")
            if len(parts) != 4 or parts[1:] != ["oauth2", "v2.0", "token"]:
                self._answer(404, {"error": "not_found", "error_description": f"no endpoint {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            form = {key: values[0] for key, values in parse_qs(self.rfile.read(length).decode()).items()}
            try:
                self._answer(200, authority.token(parts[0], form))
            except TokenRefused as refusal:
                self._answer(refusal.status, refusal.body())

        def _answer(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@dataclass
class EntraStandIn:
    """The running stand-in: `authority_host` is what AZURE_AUTHORITY_HOST names, `ca_file` what to trust."""

    authority: TokenAuthority
    authority_host: str
    ca_file: Path
    _server: ThreadingHTTPServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def tenant_id(self) -> str:
        return self.authority.tenant_id

    def workload_identity_env(self, client_id: str, token_file: Path) -> dict[str, str]:
        """The variables AKS's workload identity webhook injects into a pod."""
        return {
            "AZURE_AUTHORITY_HOST": self.authority_host,
            "AZURE_TENANT_ID": self.tenant_id,
            "AZURE_CLIENT_ID": client_id,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        }

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def start_entra_stand_in(
    ca: CertificateAuthority,
    issuer_keys: Callable[[str], Mapping[str, Any]],
    *,
    host: str = "127.0.0.1",
    tenant_id: str | None = None,
) -> EntraStandIn:
    authority = TokenAuthority(tenant_id=tenant_id or str(uuid.uuid4()), issuer_keys=issuer_keys)
    pair = ca.issue("entra", "modelapp-entra-stand-in", dns_names=("localhost",), ip_addresses=(host,), server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    server = ThreadingHTTPServer((host, 0), _handler(authority))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="entra-stand-in", daemon=True)
    thread.start()
    authority_host = f"https://{host}:{server.server_address[1]}"
    log(f"Entra ID stand-in up at {authority_host} (tenant {authority.tenant_id})")
    return EntraStandIn(authority, authority_host, ca.cert_path, server, thread)


# What AKS's workload identity webhook injects, as a MutatingAdmissionPolicy of the real API server
# (CEL, no webhook server): the projected token volume and file, the tenant and the authority. Locally it
# also mounts the stack's CA (ConfigMap LOCAL_CA_CONFIG_MAP, which the namespace must hold) and points
# SSL_CERT_FILE and REQUESTS_CA_BUNDLE at it. AZURE_CLIENT_ID is not injected (AKS reads it from the
# service account's annotation, which CEL cannot look up): the operator sets it from credentials.clientId.
WORKLOAD_IDENTITY_LABEL = "azure.workload.identity/use"
TOKEN_FOLDER = "/var/run/secrets/azure/tokens"  # noqa: S105 - a path, AKS's mount point
TOKEN_FILE = f"{TOKEN_FOLDER}/azure-identity-token"
LOCAL_CA_CONFIG_MAP = "modelapp-local-ca"
POLICY_NAME = "modelapp-local-workload-identity"


def workload_identity_policy(entra: EntraStandIn, namespace_label: str) -> list[dict[str, Any]]:
    """The MutatingAdmissionPolicy and its binding that stand in for AKS's webhook (local stack only), for
    pods labelled WORKLOAD_IDENTITY_LABEL in namespaces labelled `namespace_label: "true"`."""
    env = {
        "AZURE_TENANT_ID": entra.tenant_id,
        "AZURE_AUTHORITY_HOST": entra.authority_host,
        "AZURE_FEDERATED_TOKEN_FILE": TOKEN_FILE,
        "SSL_CERT_FILE": f"{TOKEN_FOLDER}/ca.crt",
        "REQUESTS_CA_BUNDLE": f"{TOKEN_FOLDER}/ca.crt",
    }
    env_items = ", ".join(
        f"Object.spec.containers.env{{name: {json.dumps(name)}, value: {json.dumps(value)}}}"
        for name, value in env.items()
    )
    sources = "Object.spec.volumes.projected.sources"
    volume = f"""Object.spec.volumes{{name: "azure-identity-token", projected: Object.spec.volumes.projected{{sources: [
    {sources}{{serviceAccountToken: {sources}.serviceAccountToken{{
      path: "azure-identity-token", audience: {json.dumps(ASSERTION_AUDIENCE)}, expirationSeconds: 3600}}}},
    {sources}{{configMap: {sources}.configMap{{name: {json.dumps(LOCAL_CA_CONFIG_MAP)},
      items: [{sources}.configMap.items{{key: "ca.crt", path: "ca.crt"}}]}}}}]}}}}"""
    # The volume by JSON Patch (a projected volume's sources are an atomic list, which an apply
    # configuration may not change); env and mounts, lists keyed by name, by apply configuration.
    volumes = f"""has(object.spec.volumes)
  ? [JSONPatch{{op: "add", path: "/spec/volumes/-", value: {volume}}}]
  : [JSONPatch{{op: "add", path: "/spec/volumes", value: [{volume}]}}]"""
    containers = f"""Object{{spec: Object.spec{{
  containers: object.spec.containers.map(c, Object.spec.containers{{name: c.name,
    env: [{env_items}],
    volumeMounts: [Object.spec.containers.volumeMounts{{
      name: "azure-identity-token", mountPath: {json.dumps(TOKEN_FOLDER)}, readOnly: true}}]}})}}}}"""
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": POLICY_NAME},
        "spec": {
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
                ],
                "objectSelector": {"matchLabels": {WORKLOAD_IDENTITY_LABEL: "true"}},
                "namespaceSelector": {"matchLabels": {namespace_label: "true"}},
            },
            "mutations": [
                {"patchType": "JSONPatch", "jsonPatch": {"expression": volumes}},
                {"patchType": "ApplyConfiguration", "applyConfiguration": {"expression": containers}},
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": POLICY_NAME},
        "spec": {"policyName": POLICY_NAME},
    }
    return [policy, binding]
