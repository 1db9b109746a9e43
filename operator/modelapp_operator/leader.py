"""Two replicas, one active: leader election on a coordination.k8s.io/v1 Lease, as client-go does it.

The Lease lives in the operator's own namespace (MODELAPP_LEADER_ELECTION_NAMESPACE, deploy/base/
leader-election.yaml): tenants cannot write there, so no tenant can pause the replicas or steer them.
client-go's rules (tools/leaderelection), one attempt every `retry_seconds`:
  - no Lease: create it naming this replica (AlreadyExists: someone else was first);
  - a Lease held by another whose record has not changed for `lease_seconds` (timed on this replica's
    own monotonic clock from when it saw that record, never from the record's timestamps, so clock skew
    between nodes does not matter), or with no holder: take it, `leaseTransitions` + 1;
  - a Lease held by this replica: renew it (`renewTime`; `acquireTime` kept);
  - every write is a PUT carrying the resourceVersion read: of two replicas racing, one gets 409 Conflict.
A leader that has not renewed within `renew_deadline_seconds` (< `lease_seconds`) of its last successful
renewal stops acting (`leading()` turns false) before any other replica may take the Lease; a replica
that cannot read the Lease (missing rights, API server down) is not active. A replica that stops cleanly
releases the Lease (holder emptied, duration 1 s), so the standby takes over at its next attempt.

`leading()` is the gate of the reconcile queue, the watch hub and the apply guard (reconcile/reconciler.py
checks it right before every apply and status write). `forward_target()` is where a standby forwards a
webhook: the IP of the holder's pod, read from the API in the Lease's namespace (never an address written
in the Lease or in any object a tenant can write), and the pod's `webhooks` container port.

Why not a library: kopf has only its peering (priorities in an object without a status subresource, in the
watched namespaces); the `kubernetes` package's leaderelection is synchronous (threads, `time.sleep`, the
wall clock) and kubernetes_asyncio's is a port of it, a second API client the operator does not otherwise
need; neither stops acting before its lease can expire, nor takes an injectable clock for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from modelapp_operator.config import LeaderElectionConfig
from modelapp_operator.scheduler import LOOP, Scheduler, within

_log = logging.getLogger(__name__)

LEASE_API_VERSION = "coordination.k8s.io/v1"
WEBHOOKS_PORT_NAME = "webhooks"  # the operator container's port name (deploy/base/deployment.yaml)


class LeaseApi(Protocol):
    """The API calls the election makes (clients/kube.py's AiohttpKubeClient has them)."""

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...


def micro_time(moment: datetime) -> str:
    """metav1.MicroTime as the API server writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Record:
    """The part of a Lease's spec the election compares (client-go's LeaderElectionRecord)."""

    holder: str
    lease_seconds: int
    acquire_time: str
    renew_time: str
    transitions: int

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> Record:
        spec = lease.get("spec") or {}
        try:
            duration = int(spec.get("leaseDurationSeconds") or 0)
            transitions = int(spec.get("leaseTransitions") or 0)
        except (TypeError, ValueError):
            duration, transitions = 0, 0
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            lease_seconds=duration,
            acquire_time=str(spec.get("acquireTime") or ""),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=transitions,
        )

    def spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.lease_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


class LeaderElector:
    """This replica's side of the election: `run()` until cancelled, `release()` when stopping."""

    def __init__(
        self,
        config: LeaderElectionConfig,
        api: LeaseApi,
        *,
        receiver_port: int | None = None,
        scheduler: Scheduler = LOOP,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.config = config
        self.identity = config.identity
        self._api = api
        self._receiver_port = receiver_port
        self._scheduler = scheduler
        self._wall = wall_clock
        self._on_change = on_change
        self._observed: Record | None = None
        self._observed_at = 0.0  # monotonic: when the record last changed, as this replica saw it
        self._renewed_at: float | None = None  # monotonic, taken before the write that renewed: this replica leads
        self._target: tuple[str, str] | None = None  # (holder, "ip:port") of the holder's pod
        self._announced = False
        self._stopped = False  # released: no more attempts

    # --- the verdict ---------------------------------------------------------------------------------

    def leading(self) -> bool:
        """Holds the Lease and renewed it within the renew deadline: may reconcile and write now."""
        renewed = self._renewed_at
        return renewed is not None and self._scheduler.time() < renewed + self.config.renew_deadline_seconds

    def holder(self) -> str | None:
        """The replica another one's Lease names while it is unexpired as seen here (None: none known)."""
        record = self._observed
        if record is None or not record.holder or record.holder == self.identity or self.leading():
            return None  # none, or this replica: a webhook is never forwarded to itself
        if self._scheduler.time() >= self._observed_at + self._duration(record):
            return None
        return record.holder

    def _duration(self, record: Record) -> float:
        """How long a record stands unrenewed before it may be taken: the duration it states (client-go)."""
        return float(record.lease_seconds) if record.lease_seconds > 0 else self.config.lease_seconds

    def forward_target(self) -> str | None:
        """None: handle webhooks here (this replica leads); else the leader's receiver "ip:port", "" if unknown."""
        if self.leading():
            return None
        holder = self.holder()
        if holder is None or self._target is None or self._target[0] != holder:
            return ""
        return self._target[1]

    # --- the election --------------------------------------------------------------------------------

    def _lease_body(self, record: Record, resource_version: str | None = None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.config.lease_name, "namespace": self.config.namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": metadata, "spec": record.spec()}

    async def try_acquire_or_renew(self) -> bool:
        """One attempt (client-go's tryAcquireOrRenew); True: this replica holds the Lease now."""
        started = self._scheduler.time()
        now = micro_time(self._wall())
        mine = Record(self.identity, max(1, round(self.config.lease_seconds)), now, now, 0)
        lease = await self._api.get(LEASE_API_VERSION, "Lease", self.config.namespace, self.config.lease_name)
        if lease is None:
            created = await self._api.create(self._lease_body(mine))
            self._seen(Record.of(created), self._scheduler.time())
            self._renewed(started)
            return True
        old = Record.of(lease)
        if old != self._observed:
            self._seen(old, self._scheduler.time())
        i_hold = old.holder == self.identity
        expired = self._scheduler.time() >= self._observed_at + self._duration(old)
        if old.holder and not i_hold and not expired:
            self._renewed_at = None  # another replica holds it: stop at once, not at the renew deadline
            return False
        if i_hold:
            mine = Record(mine.holder, mine.lease_seconds, old.acquire_time or now, now, old.transitions)
        else:
            mine = Record(mine.holder, mine.lease_seconds, now, now, old.transitions + 1)
        version = (lease.get("metadata") or {}).get("resourceVersion")
        updated = await self._api.replace(self._lease_body(mine, str(version) if version else None))
        self._seen(Record.of(updated), self._scheduler.time())
        self._renewed(started)
        return True

    def _seen(self, record: Record, at: float) -> None:
        if record != self._observed:
            before = self._observed.holder if self._observed is not None else None
            if record.holder != before and record.holder and record.holder != self.identity:
                _log.info("leader election: %s holds the Lease; this replica stands by", record.holder)
            self._observed, self._observed_at = record, at

    def _renewed(self, started: float) -> None:
        if self._stopped:
            return  # an attempt that ended after release(): this replica stays out
        self._renewed_at = started
        self._announce()

    def _announce(self) -> None:
        leading = self.leading()
        if leading == self._announced:
            return
        self._announced = leading
        if leading:
            _log.info("leader election: this replica (%s) is now active", self.identity)
        else:
            _log.info("leader election: this replica (%s) is now the standby", self.identity)
        if self._on_change is not None:
            self._on_change(leading)

    async def attempt(self) -> None:
        """One round: acquire or renew (bounded by the renew deadline), then find the holder's pod."""
        if self._stopped:
            return
        try:
            await within(self._scheduler, self.config.renew_deadline_seconds, self.try_acquire_or_renew())
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if getattr(error, "status", None) == 409:  # another replica wrote first: its turn
                _log.debug("leader election: lost a race for the Lease: %s", error)
            else:
                _log.warning("leader election: cannot read or write the Lease: %s: %s", type(error).__name__, error)
        self._announce()  # past the renew deadline without a renewal: stop acting now
        if not self.leading():
            await self._find_target()

    async def run(self) -> None:
        while True:
            await self.attempt()
            await self._scheduler.sleep(self.config.retry_seconds)

    async def release(self) -> None:
        """Stopping cleanly: give the Lease up (client-go's ReleaseOnCancel), so the standby need not wait it out."""
        self._stopped = True
        if not self.leading() or self._observed is None:
            return
        self._renewed_at = None
        self._announce()
        now = micro_time(self._wall())
        with contextlib.suppress(Exception):
            lease = await self._api.get(LEASE_API_VERSION, "Lease", self.config.namespace, self.config.lease_name)
            if lease is None or Record.of(lease).holder != self.identity:
                return
            released = Record("", 1, now, now, Record.of(lease).transitions)
            version = (lease.get("metadata") or {}).get("resourceVersion")
            await self._api.replace(self._lease_body(released, str(version) if version else None))
            _log.info("leader election: released the Lease")

    # --- where the leader's receiver is ------------------------------------------------------------

    async def _find_target(self) -> None:
        """The holder's pod in the Lease's namespace: its IP and its `webhooks` port (or ours)."""
        holder = self.holder()
        if holder is None:
            self._target = None
            return
        try:
            pod = await self._api.get("v1", "Pod", self.config.namespace, holder)
        except Exception as error:
            _log.warning("leader election: cannot read the pod of %s: %s", holder, type(error).__name__)
            self._target = None
            return
        self._target = (holder, address) if (address := pod_address(pod, self._receiver_port)) else None


def pod_address(pod: Mapping[str, Any] | None, default_port: int | None) -> str | None:
    """A running pod's "ip:port" for its webhook receiver, from what the kubelet and the API server wrote."""
    if not pod:
        return None
    status = pod.get("status") or {}
    try:
        ip = str(ipaddress.ip_address(str(status.get("podIP") or "")))
    except ValueError:
        return None
    if status.get("phase") != "Running" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    port = default_port
    for container in (pod.get("spec") or {}).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == WEBHOOKS_PORT_NAME and isinstance(declared.get("containerPort"), int):
                port = declared["containerPort"]
    if port is None:
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
