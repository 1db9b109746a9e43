"""Two replicas, one active: kopf peering decides; this module follows kopf's verdict for our own loops.

kopf in peering mode (`kopf.run(peering_name=..., priority=...)`) writes every replica's priority
and last keep-alive into a KopfPeering object (ClusterKopfPeering for a cluster-wide operator) and
pauses each replica that sees a live peer with a higher priority (equal priorities pause all of
them, so every replica gets a distinct one). A replica silent for `lifetime` seconds is dead: the
standby resumes then, and a SIGTERMed replica removes itself at once.

kopf's pause covers its handlers. The operator's own loops (the watch hub's polls and its direct
reconciles, the webhook receiver) ask `PeeringView.active`, which reads the same object and applies
the same rule. The view also names the active replica's receiver address (the identity kopf
publishes is `<pod>@<host:port>`), so a webhook that reaches the standby is forwarded there.

Priorities: the oldest replica acts (priority falls with the start time, the pod uid breaks ties),
so a replica that restarts joins as the standby and never causes a second hand-over.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from modelapp_operator.config import PeeringConfig

_log = logging.getLogger(__name__)

PEERING_GROUP_VERSION = "kopf.dev/v1"
REFRESH_SECONDS = 1.0
_EPOCH_BOUND_MS = 2**41  # start times in ms stay below this until the year 2039


def own_priority(config: PeeringConfig, started_ms: int | None = None) -> int:
    """Distinct per replica: higher for an earlier start; the pod uid (or pid) breaks ties."""
    if config.priority is not None:
        return config.priority
    started = int(time.time() * 1000) if started_ms is None else started_ms
    salt = config.pod_uid or f"{socket.gethostname()}/{os.getpid()}"
    tie = int(hashlib.sha256(salt.encode()).hexdigest()[:6], 16) % 1024
    return (_EPOCH_BOUND_MS - started) * 1024 + tie


def own_identity(config: PeeringConfig) -> str:
    name = config.pod_name or f"{socket.gethostname()}-{os.getpid()}"
    return f"{name}@{config.advertise}" if config.advertise else name


def address_of(identity: str) -> str | None:
    """The receiver address a peer's identity publishes, if any."""
    _, at, address = identity.rpartition("@")
    return address if at and ":" in address else None


@dataclass(frozen=True)
class Verdict:
    active: bool
    leader: str | None  # the identity of the replica that acts (None: none known)


def judge(status: Mapping[str, Any], identity: str, priority: int, now: datetime) -> Verdict:
    """kopf's rule: pause while a live peer has a higher or the same priority."""
    best: tuple[int, str] | None = None
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            seen = datetime.fromisoformat(str(info.get("lastseen")))
            lifetime = timedelta(seconds=int(info.get("lifetime", 60)))
            peer_priority = int(info.get("priority", 0))
        except (TypeError, ValueError):
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
        if seen + lifetime <= now:
            continue  # dead
        if peer_priority >= priority and (best is None or peer_priority > best[0]):
            best = (peer_priority, peer)
    if best is None:
        return Verdict(active=True, leader=identity)
    return Verdict(active=False, leader=best[1])


Reader = Callable[[str], Awaitable[Mapping[str, Any] | None]]


class PeeringView:
    """Whether this replica acts now, refreshed from the peering object(s) every REFRESH_SECONDS."""

    def __init__(
        self,
        config: PeeringConfig,
        namespaces: Sequence[str],
        read: Reader,
        *,
        on_change: Callable[[bool], None] | None = None,
        identity: str | None = None,
        priority: int | None = None,
    ) -> None:
        self.identity = identity or own_identity(config)
        self.priority = own_priority(config) if priority is None else priority
        if namespaces:
            self._paths = [
                f"/apis/{PEERING_GROUP_VERSION}/namespaces/{quote(ns, safe='')}/kopfpeerings/{config.name}"
                for ns in namespaces
            ]
        else:
            self._paths = [f"/apis/{PEERING_GROUP_VERSION}/clusterkopfpeerings/{config.name}"]
        self._read = read
        self._on_change = on_change
        # Like kopf with mandatory peering: paused until the peering object says otherwise.
        self.verdict = Verdict(active=False, leader=None)

    @property
    def active(self) -> bool:
        return self.verdict.active

    def forward_target(self) -> str | None:
        """None: handle webhooks here (active); else the active replica's address ("" if unknown)."""
        if self.verdict.active:
            return None
        return (address_of(self.verdict.leader) if self.verdict.leader else None) or ""

    async def refresh(self, now: datetime | None = None) -> Verdict:
        verdicts = []
        for path in self._paths:
            body = await self._read(path)
            status = (body or {}).get("status") or {}
            verdicts.append(judge(status, self.identity, self.priority, now or datetime.now(UTC)))
        verdict = Verdict(
            active=bool(verdicts) and all(v.active for v in verdicts),
            leader=next((v.leader for v in verdicts if not v.active), self.identity),
        )
        if verdict.active != self.verdict.active:
            _log.info(
                "peering: this replica (%s) is now %s",
                self.identity,
                "active" if verdict.active else f"the standby of {verdict.leader}",
            )
            if self._on_change is not None:
                self._on_change(verdict.active)
        self.verdict = verdict
        return verdict

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # keep the last verdict, as kopf does while it cannot watch
                _log.warning("peering: cannot read the peering object: %s: %s", type(error).__name__, error)
            await asyncio.sleep(REFRESH_SECONDS)
