"""ChildRefresher: Deployment events collapse to one status refresh per ModelApp, from the newest copy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import pytest
from modelapp_operator.reconcile import child_refresher as handlers

pytestmark = pytest.mark.unit


class _RecordingRefresh:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, Mapping[str, Any] | None]] = []
        self.fail = fail

    async def __call__(
        self, namespace: str, name: str, deps: Any, deployment_seen: Mapping[str, Any] | None = None
    ) -> None:
        self.calls.append((namespace, name, deployment_seen))
        if self.fail:
            raise RuntimeError("apiserver went away")


def _deployment(generation: int) -> dict[str, Any]:
    return {"metadata": {"generation": generation}}


async def test_a_burst_of_events_becomes_one_refresh_with_the_newest_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    refresh = _RecordingRefresh()
    monkeypatch.setattr(handlers, "refresh_status", refresh)
    monkeypatch.setattr(handlers, "CHILD_REFRESH_COALESCE_SECONDS", 0.05)
    refresher = handlers.ChildRefresher(deps=None, logger=logging.getLogger("test"))  # type: ignore[arg-type]
    for generation in range(1, 6):
        refresher.submit(("ml", "a"), _deployment(generation))
    refresher.submit(("ml", "b"), _deployment(1))
    await asyncio.sleep(0.2)
    assert sorted(refresh.calls, key=lambda call: call[1]) == [
        ("ml", "a", _deployment(5)),
        ("ml", "b", _deployment(1)),
    ]
    await refresher.close()


async def test_a_failed_refresh_is_logged_and_the_next_event_starts_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refresh = _RecordingRefresh(fail=True)
    monkeypatch.setattr(handlers, "refresh_status", refresh)
    monkeypatch.setattr(handlers, "CHILD_REFRESH_COALESCE_SECONDS", 0.01)
    refresher = handlers.ChildRefresher(deps=None, logger=logging.getLogger("test"))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        refresher.submit(("ml", "a"), _deployment(1))
        await asyncio.sleep(0.1)
        refresher.submit(("ml", "a"), _deployment(2))
        await asyncio.sleep(0.1)
    assert [call[2] for call in refresh.calls] == [_deployment(1), _deployment(2)]
    assert "status refresh of ModelApp ml/a failed: apiserver went away" in caplog.text
    await refresher.close()


async def test_close_cancels_pending_refreshes(monkeypatch: pytest.MonkeyPatch) -> None:
    refresh = _RecordingRefresh()
    monkeypatch.setattr(handlers, "refresh_status", refresh)
    monkeypatch.setattr(handlers, "CHILD_REFRESH_COALESCE_SECONDS", 10.0)
    refresher = handlers.ChildRefresher(deps=None, logger=logging.getLogger("test"))  # type: ignore[arg-type]
    refresher.submit(("ml", "a"), _deployment(1))
    await asyncio.sleep(0)
    await refresher.close()
    assert refresh.calls == []


async def test_a_stalled_rollout_is_refreshed_again_from_a_fresh_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pod refusing its model changes nothing in the Deployment: no event follows, so the refresher
    # looks again (plan.refusal.next_recheck_delay decides) with the Deployment read anew (None).
    progressing = {"history": [{"revision": 2, "outcome": "Progressing"}], "conditions": []}
    calls: list[Mapping[str, Any] | None] = []

    async def refresh(
        namespace: str, name: str, deps: Any, deployment_seen: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        calls.append(deployment_seen)
        return progressing if len(calls) < 3 else {"history": [{"revision": 2, "outcome": "Ready"}]}

    monkeypatch.setattr(handlers, "refresh_status", refresh)
    monkeypatch.setattr(handlers, "CHILD_REFRESH_COALESCE_SECONDS", 0.01)
    monkeypatch.setattr(
        handlers, "next_recheck_delay", lambda status, previous: 0.02 if status is progressing else None
    )
    refresher = handlers.ChildRefresher(deps=None, logger=logging.getLogger("test"))  # type: ignore[arg-type]
    refresher.submit(("ml", "a"), _deployment(1))
    await asyncio.sleep(0.3)
    assert calls == [_deployment(1), None, None]  # the third refresh saw it Ready: no more rechecks
    await refresher.close()
