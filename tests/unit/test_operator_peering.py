"""Two replicas, one active: the view follows kopf's peering rule and names the active replica's receiver."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from modelapp_operator.config import ConfigError, OperatorConfig, PeeringConfig
from modelapp_operator.peering import PeeringView, address_of, judge, own_priority

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def peer(priority: int, seconds_ago: float, lifetime: int = 10) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seconds_ago)).isoformat()}


def test_the_highest_live_priority_acts_and_dead_peers_do_not_count() -> None:
    status = {"a@10.0.0.1:8082": peer(5, 1), "b@10.0.0.2:8082": peer(9, 30)}  # b is dead
    assert judge(status, "me", 7, NOW).active
    status["b@10.0.0.2:8082"] = peer(9, 2)
    verdict = judge(status, "me", 7, NOW)
    assert not verdict.active and verdict.leader == "b@10.0.0.2:8082"
    assert address_of(verdict.leader or "") == "10.0.0.2:8082"


def test_equal_priorities_pause_both_as_kopf_does() -> None:
    assert not judge({"other": peer(7, 1)}, "me", 7, NOW).active


def test_the_older_replica_gets_the_higher_priority_and_ties_differ_by_uid() -> None:
    older = own_priority(PeeringConfig(name="p", pod_uid="a"), started_ms=1_000)
    newer = own_priority(PeeringConfig(name="p", pod_uid="a"), started_ms=2_000)
    assert older > newer
    assert own_priority(PeeringConfig(name="p", pod_uid="a"), 1_000) != own_priority(
        PeeringConfig(name="p", pod_uid="b"), 1_000
    )
    assert own_priority(PeeringConfig(name="p", priority=3)) == 3


async def test_the_standby_forwards_to_the_active_replica_and_takes_over_when_it_dies() -> None:
    objects: dict[str, Any] = {"status": {"old@10.0.0.1:8082": peer(9, 1)}}
    changes: list[bool] = []

    async def read(path: str) -> dict[str, Any]:
        assert path == "/apis/kopf.dev/v1/namespaces/ml/kopfpeerings/modelapp"
        return objects

    view = PeeringView(
        PeeringConfig(name="modelapp"), ["ml"], read, on_change=changes.append, identity="new", priority=1
    )
    assert view.forward_target() == ""  # nothing read yet: paused, no active replica known
    await view.refresh(NOW)
    assert not view.active and view.forward_target() == "10.0.0.1:8082"
    await view.refresh(NOW + timedelta(seconds=15))  # the active one went silent for its lifetime
    assert view.active and view.forward_target() is None and changes == [True]


def test_peering_config() -> None:
    config = OperatorConfig.from_env(
        {"MODELAPP_PEERING": "modelapp", "MODELAPP_POD_IP": "10.1.2.3", "MODELAPP_RECEIVER_PORT": "9000"}
    )
    assert config.peering == PeeringConfig(name="modelapp", advertise="10.1.2.3:9000")
    assert OperatorConfig.from_env({}).peering is None
    with pytest.raises(ConfigError, match="MODELAPP_PEERING_LIFETIME_SECONDS"):
        OperatorConfig.from_env({"MODELAPP_PEERING": "p", "MODELAPP_PEERING_LIFETIME_SECONDS": "1"})
