"""The operator's request savings: overlapping Secret reads share one GET; stale watch copies are skipped."""

from __future__ import annotations

import asyncio

import pytest
from modelapp_operator.clients.kube import AiohttpKubeClient
from modelapp_operator.reconcile.caches import AppState, ChildCache

pytestmark = pytest.mark.unit


class CountingClient(AiohttpKubeClient):
    def __init__(self) -> None:
        super().__init__("https://127.0.0.1:1", ssl_context=None, headers=dict)
        self.reads = 0
        self.gate = asyncio.Event()
        self.fail = False

    async def _read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        self.reads += 1
        number = self.reads
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("boom")
        return {"key": f"{namespace}/{name}#{number}".encode()}


async def test_overlapping_secret_reads_share_one_request_and_later_reads_go_again() -> None:
    client = CountingClient()
    try:
        first = [asyncio.create_task(client.read_secret("ns", "s")) for _ in range(5)]
        other = asyncio.create_task(client.read_secret("ns", "other"))
        await asyncio.sleep(0)
        client.gate.set()
        results = await asyncio.gather(*first, other)
        assert client.reads == 2
        assert {r["key"] for r in results[:5] if r} == {b"ns/s#1"}
        again = await client.read_secret("ns", "s")
        assert again == {"key": b"ns/s#3"} and client.reads == 3
    finally:
        await client.close()


async def test_a_failed_shared_read_fails_every_waiter_and_is_not_remembered() -> None:
    client = CountingClient()
    try:
        client.fail = True
        tasks = [asyncio.create_task(client.read_secret("ns", "s")) for _ in range(3)]
        await asyncio.sleep(0)
        client.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results) and client.reads == 1
        client.fail = False
        assert await client.read_secret("ns", "s") == {"key": b"ns/s#2"}
    finally:
        await client.close()


async def test_a_cancelled_leader_does_not_cancel_the_readers_that_joined_it() -> None:
    client = CountingClient()
    try:
        leader = asyncio.create_task(client.read_secret("ns", "s"))
        await asyncio.sleep(0)
        follower = asyncio.create_task(client.read_secret("ns", "s"))
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0)
        client.gate.set()
        assert await follower == {"key": b"ns/s#2"}
        assert leader.cancelled()
    finally:
        await client.close()


def test_a_deployment_copy_older_than_our_last_apply_is_recognised_until_the_app_is_forgotten() -> None:
    state, app = AppState(children=ChildCache(lambda kind, ns, name: None)), ("ns", "app")
    assert not state.predates_apply(app, {"metadata": {"generation": 1}})  # nothing applied yet
    state.record_applied(app, {"metadata": {"generation": 3}})
    assert state.predates_apply(app, {"metadata": {"generation": 2}})
    assert not state.predates_apply(app, {"metadata": {"generation": 3}})
    assert not state.predates_apply(app, {"metadata": {"generation": 4}})  # someone else's edit: look
    assert not state.predates_apply(("ns", "other"), {"metadata": {"generation": 1}})
    state.modelapps.observe(app, {"metadata": {"name": "app", "resourceVersion": "1"}})
    state.children.applied("Deployment", *app, {"metadata": {"generation": 3}})
    state.forget(app)
    assert not state.predates_apply(app, {"metadata": {"generation": 2}})
    assert state.modelapps.get(app) is None and state.children.get("Deployment", *app) is None


async def test_an_existing_secret_is_reused_for_its_ttl() -> None:
    client = CountingClient()
    client._secret_ttl = 60.0
    client.gate.set()
    try:
        first = await client.read_secret("ns", "s")
        assert await client.read_secret("ns", "s") == first and client.reads == 1
        client._secrets[("ns", "s")] = (0.0, first or {})  # expired
        assert await client.read_secret("ns", "s") == {"key": b"ns/s#2"} and client.reads == 2
    finally:
        await client.close()
