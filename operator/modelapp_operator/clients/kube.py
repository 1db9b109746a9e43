"""A small async Kubernetes API client (aiohttp) for the few calls the operator makes itself.

kopf watches and patches the ModelApps; this client reads and writes the children
(server-side apply), reads Secrets, writes the ModelApp status and posts Events.
It authenticates with the same connection info kopf would use: the pod's service
account in a cluster, else the kubeconfig (KUBECONFIG or ~/.kube/config).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

import aiohttp
import kopf
from modelapp_operator.names import API_VERSION, FIELD_MANAGER, KIND, PLURAL
from modelapp_operator.redact import redact

EventType = Literal["Normal", "Warning"]

_SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Connections to the API server held open at most (see AiohttpKubeClient).
MAX_CONNECTIONS = 64


class KubeError(Exception):
    """A Kubernetes API call failed (after the client's own handling of 404)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API error {status}: {redact(message)}")
        self.status = status


class ConflictError(KubeError):
    """409 Conflict: the object changed since it was read (optimistic concurrency); read it again and retry."""


def merge_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `previous` into `new`.

    Keys that no longer apply become null, so the API server removes them (a plain merge
    patch of `new` would keep, e.g., status.image.tag after the image moved to a digest)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = previous.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif key not in previous or before != value:
            patch[key] = value
    for key in previous:
        if key not in new:
            patch[key] = None
    return patch


class KubeClient(Protocol):
    """The Kubernetes calls reconcile needs."""

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]: ...

    async def delete_child(self, api_version: str, kind: str, namespace: str, name: str, uid: str) -> None: ...

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None: ...

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...

    async def list_pod_events(self, namespace: str, pod_name: str) -> list[dict[str, Any]]: ...

    async def patch_modelapp_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        *,
        previous: Mapping[str, Any] | None = None,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None: ...

    async def post_event(
        self, involved: Mapping[str, Any], type_: EventType, reason: str, message: str, at: datetime | None = None
    ) -> None: ...


_PLURALS = {
    "Deployment": "deployments",
    "Pod": "pods",
    "Service": "services",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "Event": "events",
    "Lease": "leases",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    KIND: PLURAL,
}


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """URL path of a namespaced resource (collection when name is None)."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{quote(namespace, safe='')}/{_PLURALS[kind]}"
    return f"{path}/{quote(name, safe='')}" if name is not None else path


class AiohttpKubeClient:
    """KubeClient on one aiohttp session. Close it with `close()`."""

    def __init__(
        self,
        server: str,
        *,
        ssl_context: ssl.SSLContext | None,
        headers: Callable[[], Mapping[str, str]],
        timeout_seconds: float = 30.0,
        secret_ttl_seconds: float = 0.0,
    ) -> None:
        self._server = server.rstrip("/")
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._headers = headers
        # No total/connect timeout: those include the wait for a free pooled connection, and
        # with 1,000 ModelApps reconciling at start-up that queue is long but moving; bound the
        # TCP connect and every read instead, so only a stuck API server times out.
        # A bounded pool: every open TLS connection costs ~200 KiB (asyncio's 128 KiB read
        # buffer plus OpenSSL's state); more than Dependencies.in_flight requests are never
        # wanted at once. (16 slowed the 1,000-app start-up: Deployments converged 13 s later.)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_seconds),
            raise_for_status=False,
        )
        # Reads of one Secret that overlap share one GET (many ModelApps of a namespace use the same Secrets).
        self._secret_reads: dict[tuple[str, str], asyncio.Future[dict[str, bytes] | None]] = {}
        # And an existing Secret read is reused this long (a missing one never is: creating it must work at once).
        self._secret_ttl = secret_ttl_seconds
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, bytes]]] = {}

    @classmethod
    def from_connection_info(
        cls, info: kopf.ConnectionInfo, *, token_file: Path | None = None, secret_ttl_seconds: float = 0.0
    ) -> AiohttpKubeClient:
        static_headers = dict(info.as_http_headers())

        def headers() -> Mapping[str, str]:
            # Projected service-account tokens rotate on disk: read the current one per request.
            if token_file is not None and token_file.exists():
                return {"Authorization": f"Bearer {token_file.read_text().strip()}"}
            return static_headers

        context = info.as_ssl_context() if info.server.startswith("https:") else None
        return cls(info.server, ssl_context=context, headers=headers, secret_ttl_seconds=secret_ttl_seconds)

    @classmethod
    def connect(cls, *, secret_ttl_seconds: float = 0.0) -> AiohttpKubeClient:
        """In a pod: the service account; elsewhere: the kubeconfig. Raises kopf.LoginError if neither."""
        settings = kopf.OperatorSettings()
        if (_SERVICE_ACCOUNT_DIR / "token").exists():
            info = kopf.login_with_service_account(settings=settings)
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
            if info is not None and host and port:
                server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
                info = _replace_server(info, server)
            if info is not None:
                return cls.from_connection_info(
                    info, token_file=_SERVICE_ACCOUNT_DIR / "token", secret_ttl_seconds=secret_ttl_seconds
                )
        info = kopf.login_with_kubeconfig(settings=settings)
        if info is None:
            raise kopf.LoginError("no service account token and no kubeconfig (set KUBECONFIG)")
        return cls.from_connection_info(info, secret_ttl_seconds=secret_ttl_seconds)

    async def close(self) -> None:
        await self._session.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json", **self._headers()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        try:
            async with self._session.request(
                method, self._server + path, data=data, headers=headers, params=params, ssl=self._ssl
            ) as response:
                text = await response.text()
                payload: Any = json.loads(text) if text and response.content_type == "application/json" else text
                return response.status, payload
        except (aiohttp.ClientError, TimeoutError) as error:
            raise KubeError(0, f"{method} {path}: {type(error).__name__}: {error}") from None

    @staticmethod
    def _check(status: int, payload: Any, what: str) -> None:
        if status >= 400:
            message = payload.get("message", "") if isinstance(payload, dict) else str(payload)[:500]
            raise KubeError(status, f"{what}: {message}")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, payload = await self._request("GET", resource_path(api_version, kind, namespace, name))
        if status == 404:
            return None
        self._check(status, payload, f"get {kind} {namespace}/{name}")
        return payload  # type: ignore[no-any-return]

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The namespace's pods matching a label selector (one list call, no watch)."""
        status, payload = await self._request(
            "GET", resource_path("v1", "Pod", namespace), params={"labelSelector": label_selector}
        )
        self._check(status, payload, f"list pods {namespace} {label_selector}")
        items = payload.get("items") if isinstance(payload, dict) else None
        return [item for item in items or [] if isinstance(item, dict)]

    async def list_pod_events(self, namespace: str, pod_name: str) -> list[dict[str, Any]]:
        """The core/v1 Events about one pod (the kubelet's probe failures and kills), one list call."""
        status, payload = await self._request(
            "GET",
            resource_path("v1", "Event", namespace),
            params={"fieldSelector": f"involvedObject.kind=Pod,involvedObject.name={pod_name}", "limit": "100"},
        )
        self._check(status, payload, f"list events of pod {namespace}/{pod_name}")
        items = payload.get("items") if isinstance(payload, dict) else None
        return [item for item in items or [] if isinstance(item, dict)]

    async def get_path(self, path: str) -> dict[str, Any] | None:
        """GET any API path; None if it does not exist."""
        status, payload = await self._request("GET", path)
        if status == 404:
            return None
        self._check(status, payload, f"get {path}")
        return payload  # type: ignore[no-any-return]

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST a new object (the leader election's Lease); ConflictError if one of that name exists."""
        metadata = obj["metadata"]
        status, payload = await self._request(
            "POST", resource_path(obj["apiVersion"], obj["kind"], metadata["namespace"]), body=obj
        )
        what = f"create {obj['kind']} {metadata['namespace']}/{metadata['name']}"
        if status == 409:
            raise ConflictError(status, f"{what}: it exists")
        self._check(status, payload, what)
        return payload  # type: ignore[no-any-return]

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT the object; with metadata.resourceVersion set, ConflictError if it changed since that version."""
        metadata = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], metadata["namespace"], metadata["name"])
        status, payload = await self._request("PUT", path, body=obj)
        what = f"replace {obj['kind']} {metadata['namespace']}/{metadata['name']}"
        if status == 409:
            raise ConflictError(status, f"{what}: changed since it was read")
        self._check(status, payload, what)
        return payload  # type: ignore[no-any-return]

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply as the operator's field manager. force: take fields another manager set
        (ours to own); without it, a field someone else set to another value fails with ConflictError
        and nothing is changed (creating: an object of someone else's under that name is left alone)."""
        metadata = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], metadata["namespace"], metadata["name"])
        status, payload = await self._request(
            "PATCH",
            path,
            body=obj,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": FIELD_MANAGER, "force": "true" if force else "false"},
        )
        if status == 409 and not force:
            raise ConflictError(status, f"apply {obj['kind']} {metadata['namespace']}/{metadata['name']}: {payload}")
        self._check(status, payload, f"apply {obj['kind']} {metadata['namespace']}/{metadata['name']}")
        return payload  # type: ignore[no-any-return]

    async def delete_child(self, api_version: str, kind: str, namespace: str, name: str, uid: str) -> None:
        """Delete a child the operator no longer renders (an HPA after spec.autoscaling is removed); the uid
        precondition leaves alone an object that replaced ours under that name meanwhile. Gone already: done."""
        status, payload = await self._request(
            "DELETE",
            resource_path(api_version, kind, namespace, name),
            body={"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}},
        )
        if status == 404:
            return
        if status == 409:
            raise ConflictError(status, f"delete {kind} {namespace}/{name}: {payload}")
        self._check(status, payload, f"delete {kind} {namespace}/{name}")

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's decoded data, or None if it does not exist.

        Single-flight: a read that starts while another read of the same Secret is in
        flight gets that read's answer; an existing Secret's answer is then reused for
        the client's secret_ttl_seconds (0: not at all, the next read sees an update)."""
        key = (namespace, name)
        cached = self._secrets.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pending = self._secret_reads.get(key)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this caller was cancelled
                # The read we joined was cancelled with its caller: read it ourselves.
        future: asyncio.Future[dict[str, bytes] | None] = asyncio.get_running_loop().create_future()
        self._secret_reads[key] = future
        try:
            data = await self._read_secret(namespace, name)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        else:
            future.set_result(data)
            if data is not None and self._secret_ttl > 0:
                self._secrets[key] = (time.monotonic() + self._secret_ttl, data)
            else:
                self._secrets.pop(key, None)
            return data
        finally:
            if self._secret_reads.get(key) is future:
                del self._secret_reads[key]

    async def _read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        secret = await self.get("v1", "Secret", namespace, name)
        if secret is None:
            return None
        return {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}

    async def patch_modelapp_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        *,
        previous: Mapping[str, Any] | None = None,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        """Write the status; returns the ModelApp as written (None: it was deleted meanwhile).

        previous: the status as read (fields it has and `status` lacks are removed);
        resource_version: the object's as read, so a write based on a stale read fails with ConflictError."""
        path = resource_path(API_VERSION, KIND, namespace, name) + "/status"
        body: dict[str, Any] = {"status": merge_patch(previous, status) if previous is not None else dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        code, payload = await self._request("PATCH", path, body=body, content_type="application/merge-patch+json")
        if code == 404:
            return None  # deleted meanwhile: nothing to report on
        if code == 409:
            raise ConflictError(code, f"status of ModelApp {namespace}/{name} changed since it was read")
        self._check(code, payload, f"patch status of ModelApp {namespace}/{name}")
        return payload if isinstance(payload, dict) else None

    async def post_event(
        self, involved: Mapping[str, Any], type_: EventType, reason: str, message: str, at: datetime | None = None
    ) -> None:
        """Post one event; at: when it happened (default now)."""
        metadata = involved.get("metadata") or {}
        namespace = metadata.get("namespace") or "default"
        now = (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{metadata.get('name', 'modelapp')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", API_VERSION),
                "kind": involved.get("kind", KIND),
                "name": metadata.get("name"),
                "namespace": namespace,
                "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": redact(message)[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": os.environ.get("HOSTNAME", FIELD_MANAGER)[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._request("POST", f"/api/v1/namespaces/{quote(namespace, safe='')}/events", body=event)
        # An event that cannot be posted (status >= 400) must not fail the reconcile: ignore it.


def _replace_server(info: kopf.ConnectionInfo, server: str) -> kopf.ConnectionInfo:
    return dataclasses.replace(info, server=server)
