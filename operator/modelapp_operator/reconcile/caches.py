"""What the reconcile reads instead of asking the API server: the watch streams' newest copies.

kopf already watches ModelApps and the child Deployments and Services. Reading those copies
instead of a GET per reconcile and per status refresh took the operator from ~13 API requests per
ModelApp on a cold start to the floor's apply pair plus its status writes (bench/scale.py).

A watch copy may lag behind what this operator itself just wrote. Two rules keep that safe:
- a ModelApp's status write carries the resourceVersion of the copy it was planned from, so a
  plan from a stale copy fails with a conflict and is made again from a GET (reconciler.py);
- generations only grow: a copy whose metadata.generation is older than one this operator has
  already seen (its own apply's answer, a GET) is never used in its place.
Copies are kept as compact JSON (`Stored`) of the fields plan/ reads (`kept_fields`): 10,000 ModelApps
with their children fit the operator's memory goal that way, not as parsed or whole objects.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelapp_operator.names import CANDIDATE_SUFFIX
from modelapp_operator.watch.keys import AppKey

Body = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Stored:
    """One object as kept here: compact JSON, deflated, not parsed. A parsed Deployment or ModelApp costs
    10-30 KiB of Python objects, its kept JSON 1-4 KiB, deflated a third of that (zlib's fastest level:
    20 us to keep, 6 us to read back, against 14 us to parse); it is parsed again only when a reconcile
    or a refresh reads it."""

    generation: int
    resource_version: int | None
    deflated: bytes

    @classmethod
    def of(cls, body: Body) -> Stored:
        kept = kept_fields(body)
        text = json.dumps(kept, separators=(",", ":")).encode()
        return cls(generation_of(kept), resource_version_of(kept), zlib.compress(text, 1))

    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(zlib.decompress(self.deflated))
        return parsed

    def is_older_than(self, other: Stored | None) -> bool:
        """Whether this is an older copy of the object than other."""
        return _older(self.generation, self.resource_version, other)


def _older(generation: int, resource_version: int | None, other: Stored | None) -> bool:
    """Whether a copy with this generation and resourceVersion is older than other. Generations only grow;
    within one, the resourceVersion tells when it is a number (it is for etcd-backed API servers). When it
    cannot tell, the copy just received wins, and a stale plan is caught by the status write's precondition."""
    if other is None:
        return False
    if generation != other.generation:
        return generation < other.generation
    theirs = other.resource_version
    return resource_version is not None and theirs is not None and resource_version < theirs


# Reads one child from a watch-fed index: (kind, namespace, name) -> its newest watched copy, or None.
IndexLookup = Callable[[str, str, str], Stored | None]
# How many of our oldest apply answers each apply checks against the watch (ChildCache._sweep).
SWEPT_PER_APPLY = 2


def generation_of(body: Body | None) -> int:
    value = ((body or {}).get("metadata") or {}).get("generation")
    return value if isinstance(value, int) else 0


def resource_version_of(body: Body | None) -> int | None:
    value = ((body or {}).get("metadata") or {}).get("resourceVersion")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def without_managed_fields(body: Body) -> dict[str, Any]:
    """managedFields are most of an applied object's size and nothing here reads them."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return {**body, "metadata": metadata}


# What plan/ reads of a pod template's spec (children.needs_apply: the first container's image).
KEPT_CONTAINER_FIELDS = ("name", "image")


def kept_fields(body: Body) -> dict[str, Any]:
    """The copy worth keeping: no managedFields, and of a pod template (a Deployment's) only its metadata
    and each container's name and image; plan/ reads nothing else of it (history, pods, status and
    children read the template's annotations, needs_apply the first image). A Deployment's JSON drops
    from 4.2 to 1.6 KiB; 10,000 of them are kept twice at a cold start (the watch's copy and our apply's)."""
    kept = without_managed_fields(body)
    spec = kept.get("spec")
    template = spec.get("template") if isinstance(spec, Mapping) else None
    pod_spec = template.get("spec") if isinstance(template, Mapping) else None
    if isinstance(spec, Mapping) and isinstance(template, Mapping) and isinstance(pod_spec, Mapping):
        containers = [
            {k: c[k] for k in KEPT_CONTAINER_FIELDS if k in c}
            for c in pod_spec.get("containers") or []
            if isinstance(c, Mapping)
        ]
        kept["spec"] = {**spec, "template": {**template, "spec": {"containers": containers}}}
    return kept


@dataclass
class ModelAppCache:
    """The newest copy of each ModelApp: from kopf's watch events and from our own status writes' answers."""

    _stored: dict[AppKey, Stored] = field(default_factory=dict)

    def observe(self, key: AppKey, body: Body) -> None:
        current = self._stored.get(key)
        generation, resource_version = generation_of(body), resource_version_of(body)
        if current is not None and resource_version is not None and resource_version == current.resource_version:
            return  # the copy already kept (the watch event of our own status write): not encoded again
        if not _older(generation, resource_version, current):
            self._stored[key] = Stored.of(body)

    def get(self, key: AppKey) -> dict[str, Any] | None:
        """A fresh parse of the newest copy (the caller may keep or change it)."""
        stored = self._stored.get(key)
        return stored.body() if stored is not None else None

    def forget(self, key: AppKey) -> None:
        self._stored.pop(key, None)


@dataclass
class ChildCache:
    """The child Deployment and Service of each ModelApp: kopf's watch-fed index, overlaid with the
    answers of our own applies until the watch catches up with them.

    `lookup` is None until the operator's indexes are available (tests and tools that build a
    reconcile without kopf): then every read is a miss and the reconcile GETs."""

    lookup: IndexLookup | None = None
    _applied: dict[tuple[str, str, str], Stored] = field(default_factory=dict)
    # Names whose next read must be a GET: an apply that trusted the watch conflicted there.
    _distrusted: set[tuple[str, str, str]] = field(default_factory=set)

    @property
    def enabled(self) -> bool:
        return self.lookup is not None

    def trusted(self, kind: str, namespace: str, name: str) -> bool:
        """Whether the watch's answer for this name may be used (else GET it once, and trust it again)."""
        key = (kind, namespace, name)
        if key in self._distrusted:
            self._distrusted.discard(key)
            return False
        return True

    def distrust(self, kind: str, namespace: str, name: str) -> None:
        self._distrusted.add((kind, namespace, name))
        self._applied.pop((kind, namespace, name), None)

    def applied(self, kind: str, namespace: str, name: str, answer: Body) -> None:
        key = (kind, namespace, name)
        self._applied.pop(key, None)  # to the end: the dict stays in the order applied
        self._applied[key] = Stored.of(answer)
        self._sweep()

    def _sweep(self) -> None:
        """Drop the oldest answers the watch has caught up with. A child that is not read again (a
        Service after its first apply) would otherwise keep its answer here for as long as it lives;
        each apply checks the two oldest, so what stays is about what the watch has not delivered yet."""
        if self.lookup is None:
            return
        for key in list(itertools.islice(self._applied, SWEPT_PER_APPLY)):
            watched = self.lookup(*key)
            if watched is not None and not watched.is_older_than(self._applied[key]):
                del self._applied[key]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert self.lookup is not None
        watched = self.lookup(kind, namespace, name)
        key = (kind, namespace, name)
        ours = self._applied.get(key)
        if ours is not None and (watched is None or watched.is_older_than(ours)):
            return ours.body()
        if ours is not None:
            del self._applied[key]  # the watch has caught up with our apply
        return watched.body() if watched is not None else None

    def forget(self, namespace: str, name: str) -> None:
        """The ModelApp is gone: what is kept for its children (the gate's candidate's too)."""
        names = {(namespace, name), (namespace, f"{name}{CANDIDATE_SUFFIX}")}
        for key in [key for key in self._applied if key[1:] in names]:
            del self._applied[key]
        self._distrusted -= {key for key in self._distrusted if key[1:] in names}


@dataclass
class AppState:
    """Everything the operator keeps per ModelApp for reconciles and status refreshes; `forget` drops all of it.

    (The queue, the child refresher, the watch hub and the metrics keep their own per-app state and
    forget it too: runtime.Runtime.forget calls each.)"""

    modelapps: ModelAppCache = field(default_factory=ModelAppCache)
    children: ChildCache = field(default_factory=ChildCache)
    # metadata.generation of the child Deployment as our last apply left it: a watch event
    # that shows an older generation predates that apply (a newer event follows).
    _applied_generations: dict[AppKey, int] = field(default_factory=dict)

    def record_applied(self, key: AppKey, deployment: Body) -> None:
        generation = (deployment.get("metadata") or {}).get("generation")
        if isinstance(generation, int):
            self._applied_generations[key] = generation

    def predates_apply(self, key: AppKey, deployment: Body) -> bool:
        """Whether this copy of the child Deployment is older than what our last apply wrote."""
        applied = self._applied_generations.get(key)
        generation = (deployment.get("metadata") or {}).get("generation")
        return applied is not None and isinstance(generation, int) and generation < applied

    def forget(self, key: AppKey) -> None:
        """The ModelApp is gone."""
        self._applied_generations.pop(key, None)
        self.modelapps.forget(key)
        self.children.forget(*key)
