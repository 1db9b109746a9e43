"""An in-memory stand-in for clients/kube.py's `KubeClient`, for unit tests of the reconcile's I/O shell.

Objects are kept by (kind, namespace, name) with what the API server would add: a uid, a resourceVersion
that grows with every write, and a metadata.generation that grows when the spec changes. Status writes
carry the resourceVersion they were planned from and conflict (409) when the object moved on since;
server-side apply without force conflicts with an object already there. It is not an API server: no
admission, no field ownership, no watch. Tests play the other actors (a person's edit, the Deployment
controller) with `edit`, `delete` and `put`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from modelapp_operator.clients.kube import ConflictError, EventType

Key = tuple[str, str, str]  # kind, namespace, name


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.events: list[tuple[str, str]] = []  # (reason, message)
        self.applies: list[tuple[str, bool]] = []  # (kind, force)
        self.status_writes = 0
        self.conflicts = 0
        self._versions = itertools.count(100)
        self._uids = itertools.count(1)

    # --- what the operator calls -------------------------------------------------------------------

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        kind, metadata = str(obj["kind"]), obj["metadata"]
        key = (kind, str(metadata["namespace"]), str(metadata["name"]))
        self.applies.append((kind, force))
        existing = self.objects.get(key)
        if existing is not None and not force:
            self.conflicts += 1
            raise ConflictError(409, f"Apply failed with 1 conflict: {kind} {key[2]} exists")
        body = copy.deepcopy(dict(obj))
        if existing is None:
            body["metadata"] = {**body["metadata"], "uid": f"uid-{next(self._uids)}"}
        else:
            body["metadata"] = {**body["metadata"], "uid": existing["metadata"]["uid"]}
            body["metadata"]["generation"] = existing["metadata"]["generation"]
            if "status" in existing:
                body["status"] = existing["status"]
        return self._store(key, body, spec_changed=existing is None or existing.get("spec") != body.get("spec"))

    async def delete_child(self, api_version: str, kind: str, namespace: str, name: str, uid: str) -> None:
        found = self.objects.get((kind, namespace, name))
        if found is not None and found["metadata"]["uid"] == uid:
            del self.objects[(kind, namespace, name)]

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return None

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        return []

    async def list_pod_events(self, namespace: str, pod_name: str) -> list[dict[str, Any]]:
        return []

    async def patch_modelapp_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        *,
        previous: Mapping[str, Any] | None = None,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        key = ("ModelApp", namespace, name)
        current = self.objects.get(key)
        if current is None:
            return None
        if resource_version is not None and resource_version != current["metadata"]["resourceVersion"]:
            self.conflicts += 1
            raise ConflictError(409, "the object has been modified; please apply your changes to the latest version")
        self.status_writes += 1
        return self._store(key, {**copy.deepcopy(current), "status": copy.deepcopy(dict(status))}, spec_changed=False)

    async def post_event(
        self, involved: Mapping[str, Any], type_: EventType, reason: str, message: str, at: datetime | None = None
    ) -> None:
        self.events.append((reason, message))

    # --- the other actors ----------------------------------------------------------------------------

    def put(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object as a person would (kubectl apply)."""
        metadata = body["metadata"]
        key = (str(body["kind"]), str(metadata["namespace"]), str(metadata["name"]))
        created = copy.deepcopy(dict(body))
        created["metadata"] = {**created["metadata"], "uid": f"uid-{next(self._uids)}", "generation": 0}
        return self._store(key, created, spec_changed=True)

    def edit(self, kind: str, namespace: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Someone else's write (kubectl edit or scale, a controller's status update)."""
        key = (kind, namespace, name)
        body = copy.deepcopy(self.objects[key])
        spec = copy.deepcopy(body.get("spec"))
        change(body)
        return self._store(key, body, spec_changed=body.get("spec") != spec)

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.objects.pop((kind, namespace, name))

    def _store(self, key: Key, body: dict[str, Any], *, spec_changed: bool) -> dict[str, Any]:
        metadata = body["metadata"]
        metadata["resourceVersion"] = str(next(self._versions))
        metadata["generation"] = int(metadata.get("generation") or 0) + (1 if spec_changed else 0)
        self.objects[key] = body
        return copy.deepcopy(body)
