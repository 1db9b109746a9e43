"""A small synchronous Kubernetes client for the `modelapp` CLI (urllib, no kopf).

The operator's own client (clients/kube.py) is async and logs in through kopf; a CLI wants
one blocking call at a time, clear errors and a fast start-up, so it reads the
kubeconfig itself: client certificate and key (files or inline data), bearer
token (or tokenFile), the cluster CA (file, inline data, or skip-verify when the
kubeconfig says so). Inside a pod it uses the pod's service account.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from modelapp_operator.names import API_VERSION, PLURAL

_SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(Exception):
    """No usable kubeconfig (missing file, no current context, unreadable credentials)."""


class KubeApiError(Exception):
    """The API server answered with an error status, or could not be reached (status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Connection:
    server: str
    namespace: str
    ssl_context: ssl.SSLContext | None
    token: str | None


def _b64_file(data: str, directory: Path, name: str) -> Path:
    path = directory / name
    path.write_bytes(base64.b64decode(data))
    path.chmod(0o600)
    return path


def _resolve(path: str, base: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


@contextlib.contextmanager
def _temporary_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="modelapp-kube-") as directory:
        yield Path(directory)


def _ssl_context(cluster: Mapping[str, Any], user: Mapping[str, Any], base: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    with _temporary_dir() as scratch:
        if cluster.get("insecure-skip-tls-verify"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            context.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            context.load_verify_locations(cafile=str(_resolve(cluster["certificate-authority"], base)))
        cert = key = None
        if user.get("client-certificate-data"):
            cert = _b64_file(user["client-certificate-data"], scratch, "client.crt")
        elif user.get("client-certificate"):
            cert = _resolve(user["client-certificate"], base)
        if user.get("client-key-data"):
            key = _b64_file(user["client-key-data"], scratch, "client.key")
        elif user.get("client-key"):
            key = _resolve(user["client-key"], base)
        if cert is not None:
            # The key is read here, while the scratch copy of inline data still exists.
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
    return context


def load_connection(kubeconfig: str | None = None, context_name: str | None = None) -> Connection:
    """Connection settings from --kubeconfig, else $KUBECONFIG (first file), else ~/.kube/config,
    else the pod's service account. Raises KubeConfigError naming what is missing."""
    path_text = kubeconfig or (os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None)
    path = Path(path_text).expanduser() if path_text else Path.home() / ".kube" / "config"
    if not path.exists():
        if kubeconfig is None and (_SERVICE_ACCOUNT_DIR / "token").exists():
            return _in_cluster()
        raise KubeConfigError(f"kubeconfig {path} does not exist (set --kubeconfig or KUBECONFIG)")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {error}") from None
    name = context_name or config.get("current-context")
    if not name:
        raise KubeConfigError(f"kubeconfig {path} has no current-context (use --context)")

    def named(section: str, wanted: str) -> dict[str, Any]:
        for item in config.get(section) or []:
            if item.get("name") == wanted:
                return dict(item.get(section[:-1]) or {})
        raise KubeConfigError(f"kubeconfig {path}: no {section[:-1]} named {wanted!r}")

    context = named("contexts", name)
    cluster = named("clusters", str(context.get("cluster")))
    user = named("users", str(context.get("user"))) if context.get("user") else {}
    server = str(cluster.get("server") or "")
    if not server:
        raise KubeConfigError(f"kubeconfig {path}: cluster {context.get('cluster')!r} has no server")
    base = path.parent
    try:
        ssl_context = _ssl_context(cluster, user, base) if server.startswith("https:") else None
    except (OSError, ssl.SSLError, ValueError) as error:
        raise KubeConfigError(f"kubeconfig {path}: unusable TLS settings: {error}") from None
    token = user.get("token")
    if not token and user.get("tokenFile"):
        try:
            token = _resolve(user["tokenFile"], base).read_text().strip()
        except OSError as error:
            raise KubeConfigError(f"kubeconfig {path}: cannot read tokenFile: {error}") from None
    has_certificate = "client-certificate" in user or "client-certificate-data" in user
    if not token and not has_certificate and user.get("exec"):
        token = _exec_token(user["exec"], path)
    if not token and not has_certificate and user.get("auth-provider"):
        raise KubeConfigError(
            f"kubeconfig {path}: user {context.get('user')!r} uses a legacy auth-provider, which this CLI does "
            "not run; on AKS convert it: kubelogin convert-kubeconfig -l azurecli"
        )
    return Connection(server.rstrip("/"), str(context.get("namespace") or "default"), ssl_context, token)


def _exec_token(spec: Mapping[str, Any], path: Path) -> str:
    """Run a client-go credential plugin (e.g. `kubelogin get-token`) and return its bearer token."""
    command = spec.get("command")
    if not command:
        raise KubeConfigError(f"kubeconfig {path}: exec plugin without a command")
    env = {**os.environ, **{str(e["name"]): str(e["value"]) for e in spec.get("env") or []}}
    env["KUBERNETES_EXEC_INFO"] = json.dumps(
        {
            "apiVersion": spec.get("apiVersion", "client.authentication.k8s.io/v1"),
            "kind": "ExecCredential",
            "spec": {"interactive": False},
        }
    )
    try:
        result = subprocess.run(
            [str(command), *[str(a) for a in spec.get("args") or []]],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KubeConfigError(f"kubeconfig {path}: credential plugin {command} failed: {error}") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise KubeConfigError(f"kubeconfig {path}: credential plugin {command} exited {result.returncode}: {last}")
    try:
        token = json.loads(result.stdout)["status"]["token"]
    except (ValueError, KeyError, TypeError):
        raise KubeConfigError(f"kubeconfig {path}: credential plugin {command} returned no token") from None
    return str(token)


def _in_cluster() -> Connection:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeConfigError("no kubeconfig and KUBERNETES_SERVICE_HOST is not set")
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    context = ssl.create_default_context(cafile=str(_SERVICE_ACCOUNT_DIR / "ca.crt"))
    namespace = (_SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
    token = (_SERVICE_ACCOUNT_DIR / "token").read_text().strip()
    return Connection(server, namespace, context, token)


class KubeClient:
    """GET, LIST and merge-PATCH of namespaced objects and access reviews; errors become KubeApiError."""

    def __init__(self, connection: Connection, *, timeout_seconds: float = 30.0) -> None:
        self.connection = connection
        self._timeout = timeout_seconds

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.connection.server + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        if self.connection.token:
            request.add_header("Authorization", f"Bearer {self.connection.token}")
        try:
            with urllib.request.urlopen(request, context=self.connection.ssl_context, timeout=self._timeout) as reply:
                text = reply.read().decode()
        except urllib.error.HTTPError as error:
            with error:
                raw = error.read().decode(errors="replace")
            try:
                status_body = json.loads(raw)
            except ValueError:
                status_body = {}
            message = status_body.get("message") if isinstance(status_body, dict) else None
            reason = status_body.get("reason") if isinstance(status_body, dict) else None
            raise KubeApiError(
                error.code, str(reason or error.reason), str(message or raw[:300] or error.reason)
            ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            cause = getattr(error, "reason", error)
            raise KubeApiError(0, "Unreachable", f"cannot reach {self.connection.server}: {cause}") from None
        return json.loads(text) if text else None

    @staticmethod
    def path(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        path = f"{base}/namespaces/{quote(namespace, safe='')}/{plural}"
        return f"{path}/{quote(name, safe='')}" if name is not None else path

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", self.path(api_version, plural, namespace, name))
        return result

    def merge_patch(
        self, api_version: str, plural: str, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PATCH", self.path(api_version, plural, namespace, name), dict(patch), "application/merge-patch+json"
        )
        return result

    def get_modelapp(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get(API_VERSION, PLURAL, namespace, name)

    def modelapp_names(self, namespace: str) -> list[str]:
        """Names of the ModelApps in a namespace (shell completion)."""
        listing = self.request("GET", self.path(API_VERSION, PLURAL, namespace)) or {}
        return sorted(str((item.get("metadata") or {}).get("name")) for item in listing.get("items") or [])

    def may(self, verb: str, resource: str, namespace: str, name: str) -> bool:
        """Whether this kubeconfig's user may `verb` the object (SelfSubjectAccessReview, which every
        authenticated user may create): asked before offering to read a Secret."""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"verb": verb, "resource": resource, "namespace": namespace, "name": name}},
        }
        answer = self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review) or {}
        return bool((answer.get("status") or {}).get("allowed"))

    def username(self) -> str:
        """The user the API server authenticates this kubeconfig as (SelfSubjectReview, which every
        authenticated user may create): the name a release gate action records."""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        answer = self.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", review) or {}
        user = ((answer.get("status") or {}).get("userInfo") or {}).get("username")
        if not isinstance(user, str) or not user:
            raise KubeApiError(0, "Unknown", "the API server did not say who this kubeconfig's user is")
        return user

    def patch_modelapp(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self.merge_patch(API_VERSION, PLURAL, namespace, name, patch)
