"""Two replicas, one active: leader election on a Lease (client-go's rules) on the virtual clock.

The Lease store below keeps what the API server guarantees the election (resourceVersion checked on
every PUT, AlreadyExists on a second create); tests/cluster/test_leader_election.py runs the same
elector against the real kube-apiserver.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from modelapp_operator.clients.kube import ConflictError, KubeError
from modelapp_operator.config import ConfigError, LeaderElectionConfig, OperatorConfig
from modelapp_operator.leader import LeaderElector, Record, micro_time, pod_address

from tests.unit.virtual_time import VirtualScheduler

pytestmark = pytest.mark.unit

NAMESPACE = "modelapp-system"
CONFIG = LeaderElectionConfig(lease_name="modelapp-operator", namespace=NAMESPACE, identity="a")


class LeaseStore:
    """Leases and pods by name, with the API server's optimistic concurrency for Leases."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 0
        self.down = False
        self.writes = 0

    def _check(self) -> None:
        if self.down:
            raise KubeError(0, "connection refused")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._check()
        found = self.objects.get((kind, name))
        return copy.deepcopy(found) if found is not None else None

    def _stored(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.writes += 1
        body = copy.deepcopy(dict(obj))
        body["metadata"] = {**body["metadata"], "resourceVersion": str(self.version)}
        self.objects[(body["kind"], body["metadata"]["name"])] = body
        return copy.deepcopy(body)

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self._check()
        if (obj["kind"], obj["metadata"]["name"]) in self.objects:
            raise ConflictError(409, "exists")
        return self._stored(obj)

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self._check()
        current = self.objects[(obj["kind"], obj["metadata"]["name"])]
        if obj["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise ConflictError(409, "changed")
        return self._stored(obj)

    def lease(self) -> Record:
        return Record.of(self.objects[("Lease", CONFIG.lease_name)])

    def patch_holder(self, holder: str) -> None:
        """What an admin (or an attacker who could write the Lease) would do: name another holder."""
        body = self.objects[("Lease", CONFIG.lease_name)]
        body["spec"]["holderIdentity"] = holder
        self.version += 1
        body["metadata"]["resourceVersion"] = str(self.version)

    def add_pod(self, name: str, ip: str, *, phase: str = "Running", port: int | None = 8082) -> None:
        ports = [{"name": "webhooks", "containerPort": port}] if port is not None else []
        self.objects[("Pod", name)] = {
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"containers": [{"name": "operator", "ports": ports}]},
            "status": {"phase": phase, "podIP": ip},
        }


class Wall:
    def __init__(self, clock: VirtualScheduler) -> None:
        self.clock = clock
        self.start = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=self.clock.time())


def elector(
    store: LeaseStore, clock: VirtualScheduler, identity: str, changes: list[bool] | None = None
) -> LeaderElector:
    config = LeaderElectionConfig(lease_name=CONFIG.lease_name, namespace=NAMESPACE, identity=identity)
    return LeaderElector(
        config,
        store,
        receiver_port=8082,
        scheduler=clock,
        wall_clock=Wall(clock),
        on_change=changes.append if changes is not None else None,
    )


async def test_the_first_replica_creates_the_lease_and_leads_and_the_second_stands_by() -> None:
    clock, store = VirtualScheduler(), LeaseStore()
    changes: list[bool] = []
    a, b = elector(store, clock, "a", changes), elector(store, clock, "b")
    assert not a.leading() and not b.leading()  # nobody acts before a Lease says so
    await a.attempt()
    await b.attempt()
    assert a.leading() and not b.leading() and changes == [True]
    lease = store.lease()
    assert (lease.holder, lease.lease_seconds, lease.transitions) == ("a", 15, 0)
    assert lease.acquire_time == lease.renew_time == micro_time(Wall(clock)())
    assert b.holder() == "a" and a.holder() is None
    # Renewals move renewTime only.
    await clock.advance(2)
    await a.attempt()
    renewed = store.lease()
    assert renewed.acquire_time == lease.acquire_time and renewed.renew_time != lease.renew_time
    assert renewed.transitions == 0


async def test_a_leader_that_cannot_renew_stops_before_its_lease_expires_and_the_standby_takes_over() -> None:
    clock, store = VirtualScheduler(), LeaseStore()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    await a.attempt()
    await b.attempt()
    seen_at = clock.time()
    # a goes silent (a partition: it can no longer reach the API server).
    store.down = True
    for _ in range(4):
        await clock.advance(2)
        await a.attempt()
    assert a.leading()  # 8 s since its last renewal: within the renew deadline
    assert a.forward_target() is None
    await clock.advance(2)
    await a.attempt()
    assert not a.leading()  # 10 s: stops acting, 5 s before anyone may take the Lease
    assert a.holder() is None and a.forward_target() == ""  # the Lease still names a: never forwarded to itself
    store.down = False
    await b.attempt()
    assert not b.leading() and clock.time() < seen_at + 15  # b waits the lease duration out
    await clock.advance(seen_at + 15 - clock.time())
    await b.attempt()
    assert b.leading()
    lease = store.lease()
    assert (lease.holder, lease.transitions) == ("b", 1)
    # a is back: it sees b's Lease and stays the standby.
    await a.attempt()
    assert not a.leading() and a.holder() == "b"


async def test_a_leader_whose_renewals_hang_stops_at_the_renew_deadline() -> None:
    clock, store = VirtualScheduler(), LeaseStore()
    a = elector(store, clock, "a")
    await a.attempt()
    assert a.leading()
    await clock.advance(9.9)
    assert a.leading()
    await clock.advance(0.2)
    assert not a.leading()  # no attempt ran at all: the verdict is a deadline, not a flag


class Stale:
    """The store as a replica saw it a moment ago: its GET of the Lease returns `seen`; writes go through."""

    def __init__(self, store: LeaseStore, seen: dict[str, Any] | None) -> None:
        self.store, self.seen = store, seen

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.seen)

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return await self.store.create(obj)

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return await self.store.replace(obj)


async def test_of_two_replicas_racing_for_a_free_lease_exactly_one_wins() -> None:
    clock, store = VirtualScheduler(), LeaseStore()
    config = LeaderElectionConfig(lease_name=CONFIG.lease_name, namespace=NAMESPACE, identity="b")
    a = elector(store, clock, "a")
    # b read the Lease as missing just before a created it: b's create is AlreadyExists.
    await a.attempt()
    late = LeaderElector(config, Stale(store, None), scheduler=clock, wall_clock=Wall(clock))
    with pytest.raises(ConflictError):
        await late.try_acquire_or_renew()
    assert not late.leading()
    # a releases; b and c both read the free Lease and PUT with its resourceVersion: one gets 409.
    await a.release()
    free = await store.get("coordination.k8s.io/v1", "Lease", NAMESPACE, CONFIG.lease_name)
    b = LeaderElector(config, Stale(store, free), scheduler=clock, wall_clock=Wall(clock))
    c_config = LeaderElectionConfig(lease_name=CONFIG.lease_name, namespace=NAMESPACE, identity="c")
    c = LeaderElector(c_config, Stale(store, free), scheduler=clock, wall_clock=Wall(clock))
    assert await b.try_acquire_or_renew()
    with pytest.raises(ConflictError):
        await c.try_acquire_or_renew()
    assert b.leading() and not c.leading() and store.lease().holder == "b"
    await c.attempt()  # the conflict is one failed attempt, not a crash
    assert not c.leading()


async def test_a_missing_or_unreadable_lease_means_not_active() -> None:
    clock, store = VirtualScheduler(), LeaseStore()
    store.down = True
    a = elector(store, clock, "a")
    for _ in range(3):
        await a.attempt()
        await clock.advance(2)
    assert not a.leading() and a.holder() is None and a.forward_target() == ""
    store.down = False
    await a.attempt()  # missing: the first replica to try creates it
    assert a.leading()


async def test_release_lets_the_standby_take_over_at_its_next_attempt() -> None:
    clock, store = VirtualScheduler(), LeaseStore()
    changes: list[bool] = []
    a, b = elector(store, clock, "a", changes), elector(store, clock, "b")
    await a.attempt()
    await b.attempt()
    await a.release()
    assert not a.leading() and changes == [True, False]
    assert (store.lease().holder, store.lease().lease_seconds) == ("", 1)
    await a.attempt()
    assert not a.leading()  # released for good: a stopping replica does not come back
    await clock.advance(2)
    await b.attempt()
    assert b.leading() and store.lease().transitions == 1


async def test_the_standby_forwards_only_to_the_holders_pod_ip_read_from_the_api() -> None:
    clock, store = VirtualScheduler(), LeaseStore()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    store.add_pod("a", "10.0.0.7", port=9000)
    await a.attempt()
    await b.attempt()
    assert a.forward_target() is None  # the leader handles webhooks itself
    assert b.forward_target() == "10.0.0.7:9000"
    # The Lease names a pod that does not exist, or an address: nobody to forward to.
    store.patch_holder("attacker.example.com:80")
    await clock.advance(2)
    await b.attempt()
    assert b.holder() == "attacker.example.com:80" and b.forward_target() == ""
    store.patch_holder("ghost")
    await clock.advance(2)
    await b.attempt()
    assert b.forward_target() == ""


def test_a_pod_address_comes_from_its_status_and_its_named_port() -> None:
    def pod(ip: str, phase: str = "Running", ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"spec": {"containers": [{"ports": ports or []}]}, "status": {"podIP": ip, "phase": phase}}

    assert pod_address(pod("10.0.0.1"), 8082) == "10.0.0.1:8082"
    assert pod_address(pod("fd00::1"), 8082) == "[fd00::1]:8082"
    assert pod_address(pod("10.0.0.1", ports=[{"name": "webhooks", "containerPort": 9}]), 8082) == "10.0.0.1:9"
    assert pod_address(pod("10.0.0.1", phase="Pending"), 8082) is None
    assert pod_address(pod("evil.example.com"), 8082) is None
    assert pod_address(pod("10.0.0.1/x@y"), 8082) is None
    assert pod_address(None, 8082) is None
    terminating = pod("10.0.0.1") | {"metadata": {"deletionTimestamp": "2026-12-02T12:00:00Z"}}
    assert pod_address(terminating, 8082) is None


def test_leader_election_config() -> None:
    env = {
        "MODELAPP_LEADER_ELECTION": "modelapp-operator",
        "MODELAPP_POD_NAMESPACE": "modelapp-system",
        "MODELAPP_POD_NAME": "modelapp-operator-abc",
    }
    config = OperatorConfig.from_env(env).leader_election
    assert config == LeaderElectionConfig("modelapp-operator", "modelapp-system", "modelapp-operator-abc")
    assert (config.lease_seconds, config.renew_deadline_seconds, config.retry_seconds) == (15.0, 10.0, 2.0)
    assert OperatorConfig.from_env({}).leader_election is None
    other = OperatorConfig.from_env(env | {"MODELAPP_LEADER_ELECTION_NAMESPACE": "ops"}).leader_election
    assert other is not None and other.namespace == "ops"
    for broken, named in (
        ({"MODELAPP_POD_NAMESPACE": ""}, "MODELAPP_POD_NAMESPACE"),
        ({"MODELAPP_POD_NAME": ""}, "MODELAPP_POD_NAME"),
        ({"MODELAPP_LEADER_ELECTION_NAMESPACE": "team-*"}, "MODELAPP_LEADER_ELECTION_NAMESPACE"),
        ({"MODELAPP_LEADER_ELECTION": "Not_A_Name"}, "MODELAPP_LEADER_ELECTION"),
        ({"MODELAPP_LEADER_ELECTION_RENEW_DEADLINE_SECONDS": "15"}, "less than"),
        ({"MODELAPP_LEADER_ELECTION_RETRY_SECONDS": "9"}, "MODELAPP_LEADER_ELECTION_RETRY_SECONDS"),
    ):
        with pytest.raises(ConfigError, match=named):
            OperatorConfig.from_env(env | broken)
