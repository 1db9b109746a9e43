"""The local stack's address plan: kwok's fake pods never hold an address a real pod, a node link or a Service
can have (kube-network-policies maps a packet's address to one pod: a fake pod holding a real pod's address made
its NetworkPolicy verdicts flap once the cluster tier had created fake pods)."""

from __future__ import annotations

import ipaddress

import pytest
from modelapp_localstack.kube import FAKE_POD_CIDR
from modelapp_localstack.node import MAX_NETWORKS

pytestmark = pytest.mark.unit


def test_fake_pod_addresses_overlap_no_real_range() -> None:
    fake = ipaddress.ip_network(FAKE_POD_CIDR)
    for index in range(MAX_NETWORKS):
        for real in (f"10.243.{index}.0/30", f"10.244.{index}.0/24", f"10.{96 + index}.0.0/16"):
            assert not fake.overlaps(ipaddress.ip_network(real)), (FAKE_POD_CIDR, real)
