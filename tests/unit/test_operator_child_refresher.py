"""ChildRefresher: Deployment events collapse to one status refresh per ModelApp, from the newest copy; a refresh
that finds drift or a missed deadline submits a reconcile to the queue. Every wait is on a virtual scheduler."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytest
from modelapp_operator.clients.kube import ConflictError
from modelapp_operator.reconcile import child_refresher as refresher_module
from modelapp_operator.reconcile.caches import AppState, ChildCache, Stored
from modelapp_operator.reconcile.child_refresher import CHILD_REFRESH_COALESCE_SECONDS, ChildRefresher
from modelapp_operator.reconcile.deps import Dependencies
from modelapp_operator.reconcile.reconciler import Refresh, Trigger
from modelapp_operator.watch.keys import AppKey

from tests.unit.virtual_time import VirtualScheduler

pytestmark = pytest.mark.unit

Call = tuple[AppKey, Mapping[str, Any] | None]


class RecordingRefresh:
    """A refresh_status double: records its calls and answers from `answers` in turn (then `Refresh()`)."""

    def __init__(self, *answers: Refresh | Exception) -> None:
        self.calls: list[Call] = []
        self.answers = list(answers)

    async def __call__(self, app: AppKey, deps: Any, deployment_seen: Mapping[str, Any] | None) -> Refresh:
        self.calls.append((app, deployment_seen))
        answer = self.answers.pop(0) if self.answers else Refresh()
        if isinstance(answer, Exception):
            raise answer
        return answer


class Submitted(list[tuple[AppKey, Trigger]]):
    def __call__(self, app: AppKey, trigger: Trigger) -> None:
        self.append((app, trigger))


def make_refresher(
    refresh: RecordingRefresh,
    clock: VirtualScheduler,
    submitted: Submitted | None = None,
    state: AppState | None = None,
) -> ChildRefresher:
    return ChildRefresher(
        # No clients: only handed to the refresh double. No index unless given: events' copies are kept.
        deps=Dependencies(clients=None, state=state or AppState()),  # type: ignore[arg-type]
        submit=submitted if submitted is not None else Submitted(),
        logger=logging.getLogger("test"),
        scheduler=clock,
        refresh=refresh,
    )


def _deployment(generation: int) -> dict[str, Any]:
    return {"metadata": {"generation": generation}}


@pytest.fixture
def clock() -> VirtualScheduler:
    return VirtualScheduler()


async def test_a_burst_of_events_becomes_one_refresh_with_the_newest_copy(clock: VirtualScheduler) -> None:
    refresh = RecordingRefresh()
    refresher = make_refresher(refresh, clock)
    for generation in range(1, 6):
        refresher.submit(("ml", "a"), _deployment(generation))
    refresher.submit(("ml", "b"), _deployment(1))
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS - 0.1)
    assert refresh.calls == []  # still collecting the rollout's steps
    await clock.advance(0.1)
    assert sorted(refresh.calls, key=lambda call: call[0]) == [
        (("ml", "a"), _deployment(5)),
        (("ml", "b"), _deployment(1)),
    ]
    await refresher.close()


async def test_with_the_watch_index_no_copy_is_kept_and_the_refresh_reads_the_index(clock: VirtualScheduler) -> None:
    index: dict[tuple[str, str, str], Stored] = {}
    refresh = RecordingRefresh()
    refresher = make_refresher(refresh, clock, state=AppState(children=ChildCache(lambda *key: index.get(key))))
    event = {
        **_deployment(1),
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "i", "env": []}]}}},
    }
    index[("Deployment", "ml", "a")] = Stored.of(event)
    refresher.submit(("ml", "a"), event)
    refresher.submit(("ml", "gone"), _deployment(1))  # deleted before its refresh: its DELETED event recreates it
    assert all(value is refresher_module.WATCHED for value in refresher._pending.values())  # no copy held
    index[("Deployment", "ml", "a")] = Stored.of(_deployment(2))  # a newer event reached the index meanwhile
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
    assert refresh.calls == [(("ml", "a"), _deployment(2))]
    assert Stored.of(event).body()["spec"]["template"]["spec"] == {"containers": [{"name": "app", "image": "i"}]}
    await refresher.close()


async def test_a_failed_refresh_is_logged_and_the_next_event_starts_again(
    clock: VirtualScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    refresh = RecordingRefresh(RuntimeError("apiserver went away"), RuntimeError("apiserver went away"))
    refresher = make_refresher(refresh, clock)
    with caplog.at_level(logging.WARNING):
        refresher.submit(("ml", "a"), _deployment(1))
        await clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
        refresher.submit(("ml", "a"), _deployment(2))
        await clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
    assert [call[1] for call in refresh.calls] == [_deployment(1), _deployment(2)]
    assert "status refresh of ModelApp ml/a failed: apiserver went away" in caplog.text
    await refresher.close()


async def test_a_failed_refresh_is_tried_again_without_another_event(clock: VirtualScheduler) -> None:
    """The API server away during a rollout: the Deployment events of its end may come while the watch
    reconnects, so the refresh is retried on its own backoff until one succeeds."""
    from modelapp_operator.plan.pods import RECHECK_FIRST_SECONDS

    outage = RuntimeError("apiserver went away")
    refresh = RecordingRefresh(outage, outage, Refresh({"conditions": []}))
    refresher = make_refresher(refresh, clock)
    refresher.submit(("ml", "a"), _deployment(1))
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
    await clock.advance(RECHECK_FIRST_SECONDS + CHILD_REFRESH_COALESCE_SECONDS)
    assert len(refresh.calls) == 2
    await clock.advance(2 * RECHECK_FIRST_SECONDS + CHILD_REFRESH_COALESCE_SECONDS)
    assert len(refresh.calls) == 3
    await clock.advance(600)
    assert len(refresh.calls) == 3  # succeeded, nothing rolled out to look at: no more rechecks
    await refresher.close()


async def test_a_conflict_refreshes_again_from_a_fresh_read(clock: VirtualScheduler) -> None:
    refresh = RecordingRefresh(ConflictError(409, "the ModelApp changed"), Refresh({"conditions": []}))
    refresher = make_refresher(refresh, clock)
    refresher.submit(("ml", "a"), _deployment(1))
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
    assert [call[1] for call in refresh.calls] == [_deployment(1), _deployment(1)]
    await refresher.close()


async def test_close_cancels_pending_refreshes(clock: VirtualScheduler) -> None:
    refresh = RecordingRefresh()
    refresher = make_refresher(refresh, clock)
    refresher.submit(("ml", "a"), _deployment(1))
    await clock.settle()
    await refresher.close()
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
    assert refresh.calls == []


async def test_drift_and_a_missed_deadline_are_submitted_to_the_queue(clock: VirtualScheduler) -> None:
    refresh = RecordingRefresh(Refresh({"conditions": []}, reconcile="drift"), Refresh(reconcile="rollback"))
    submitted = Submitted()
    refresher = make_refresher(refresh, clock, submitted)
    refresher.submit(("ml", "a"), _deployment(1))
    refresher.submit(("ml", "b"), _deployment(1))
    refresher.submit(("ml", "c"), _deployment(1))  # nothing to do: nothing submitted
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
    assert submitted == [(("ml", "a"), "drift"), (("ml", "b"), "rollback")]
    await refresher.close()


async def test_a_stalled_rollout_is_refreshed_again_from_a_fresh_read(
    clock: VirtualScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pod refusing its model changes nothing in the Deployment: no event follows, so the refresher
    # looks again (plan.pods.next_recheck_delay decides) with the Deployment read anew (None).
    progressing = {"history": [{"revision": 2, "outcome": "Progressing"}], "conditions": []}
    ready = {"history": [{"revision": 2, "outcome": "Ready"}]}
    refresh = RecordingRefresh(Refresh(progressing), Refresh(progressing), Refresh(ready))
    monkeypatch.setattr(
        refresher_module,
        "next_recheck_delay",
        lambda status, previous, failed=False: 5.0 if status is progressing else None,
    )
    refresher = make_refresher(refresh, clock)
    refresher.submit(("ml", "a"), _deployment(1))
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS + 5.0)
    assert [call[1] for call in refresh.calls] == [_deployment(1)]  # the recheck's own coalescing wait
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS + 5.0 + CHILD_REFRESH_COALESCE_SECONDS)
    assert [call[1] for call in refresh.calls] == [_deployment(1), None, None]  # the third saw it Ready
    await clock.advance(3600)
    assert len(refresh.calls) == 3 and clock.timers == 0  # no more rechecks
    await refresher.close()


async def test_a_forgotten_modelapp_is_not_rechecked(clock: VirtualScheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refresher_module, "next_recheck_delay", lambda status, previous, failed=False: 5.0)
    refresh = RecordingRefresh(Refresh({"conditions": []}))
    refresher = make_refresher(refresh, clock)
    refresher.submit(("ml", "a"), _deployment(1))
    await clock.advance(CHILD_REFRESH_COALESCE_SECONDS)
    assert clock.timers == 1
    refresher.forget(("ml", "a"))
    await clock.advance(60)
    assert len(refresh.calls) == 1 and clock.timers == 0
    await refresher.close()
