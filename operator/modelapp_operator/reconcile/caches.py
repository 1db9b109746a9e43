"""What the reconcile reads instead of asking the API server: the watch streams' newest copies.

kopf already watches ModelApps and the child Deployments and Services. Reading those copies
instead of a GET per reconcile and per status refresh took the operator from ~13 API requests per
ModelApp on a cold start to the floor's apply pair plus its status writes (bench/scale.py).

A watch copy may lag behind what this operator itself just wrote. Two rules keep that safe:
- a ModelApp's status write carries the resourceVersion of the copy it was planned from, so a
  plan from a stale copy fails with a conflict and is made again from a GET (reconciler.py);
- generations only grow: a copy whose metadata.generation is older than one this operator has
  already seen (its own apply's answer, a GET) is never used in its place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelapp_operator.watch.keys import AppKey

Body = Mapping[str, Any]
# Reads one child from a watch-fed index: (kind, namespace, name) -> its newest watched copy, or None.
IndexLookup = Callable[[str, str, str], Body | None]


def generation_of(body: Body | None) -> int:
    value = ((body or {}).get("metadata") or {}).get("generation")
    return value if isinstance(value, int) else 0


def resource_version_of(body: Body | None) -> int | None:
    """The resourceVersion as a number, when it is one (it is for etcd-backed API servers).

    Only used to tell which of two copies of one object is newer; when it cannot tell, the
    copy just received wins, and a stale plan is caught by the status write's precondition."""
    value = ((body or {}).get("metadata") or {}).get("resourceVersion")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def is_older(candidate: Body, current: Body | None) -> bool:
    """Whether candidate is an older copy of the object than current."""
    if current is None:
        return False
    if generation_of(candidate) != generation_of(current):
        return generation_of(candidate) < generation_of(current)
    new, old = resource_version_of(candidate), resource_version_of(current)
    return new is not None and old is not None and new < old


def without_managed_fields(body: Body) -> dict[str, Any]:
    """The copy worth keeping: managedFields are most of an applied object's size and nothing here reads them."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return {**body, "metadata": metadata}


@dataclass
class ModelAppCache:
    """The newest copy of each ModelApp: from kopf's watch events and from our own status writes' answers."""

    _bodies: dict[AppKey, Body] = field(default_factory=dict)

    def observe(self, key: AppKey, body: Body) -> None:
        if not is_older(body, self._bodies.get(key)):
            self._bodies[key] = body

    def get(self, key: AppKey) -> Body | None:
        return self._bodies.get(key)

    def forget(self, key: AppKey) -> None:
        self._bodies.pop(key, None)

    def keys(self) -> Iterable[AppKey]:
        return self._bodies.keys()

    def __len__(self) -> int:
        return len(self._bodies)


@dataclass
class ChildCache:
    """The child Deployment and Service of each ModelApp: kopf's watch-fed index, overlaid with the
    answers of our own applies until the watch catches up with them.

    `lookup` is None until the operator's indexes are available (tests and tools that build a
    reconcile without kopf): then every read is a miss and the reconcile GETs."""

    lookup: IndexLookup | None = None
    _applied: dict[tuple[str, str, str], Body] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.lookup is not None

    def applied(self, kind: str, namespace: str, name: str, answer: Body) -> None:
        self._applied[(kind, namespace, name)] = without_managed_fields(answer)

    def get(self, kind: str, namespace: str, name: str) -> Body | None:
        assert self.lookup is not None
        watched = self.lookup(kind, namespace, name)
        key = (kind, namespace, name)
        ours = self._applied.get(key)
        if ours is None:
            return watched
        if watched is not None and not is_older(watched, ours):
            del self._applied[key]  # the watch has caught up with our apply
            return watched
        return ours

    def forget(self, namespace: str, name: str) -> None:
        for key in [key for key in self._applied if key[1:] == (namespace, name)]:
            del self._applied[key]
