"""The reconcile queue and the watch caches: which events reconcile, one run at a time, backoff, newest copies.

Every wait is on a virtual scheduler (tests/unit/virtual_time.py): no test waits in real time."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from modelapp_operator.names import ANNOTATION_RECONCILE_REQUEST
from modelapp_operator.reconcile import queue as queue_module
from modelapp_operator.reconcile.caches import ChildCache, ModelAppCache, Stored, without_managed_fields
from modelapp_operator.reconcile.events import EventRecorder
from modelapp_operator.reconcile.queue import ReconcileQueue, handled_state, wants_reconcile
from modelapp_operator.reconcile.reconciler import (
    NotLeading,
    PermanentReconcileError,
    ReconcileResult,
    TemporaryReconcileError,
    Trigger,
)
from modelapp_operator.watch.keys import AppKey

from tests.unit.virtual_time import VirtualScheduler

pytestmark = pytest.mark.unit

KEY = ("ns", "app")
OTHER = ("ns", "other")


def body(generation: int = 1, rv: str = "10", request: str | None = None, **status: Any) -> dict[str, Any]:
    annotations = {ANNOTATION_RECONCILE_REQUEST: request} if request else {}
    metadata = {"namespace": "ns", "name": "app", "generation": generation, "resourceVersion": rv}
    return {"metadata": {**metadata, "annotations": annotations}, "status": status}


def test_first_sight_spec_changes_and_requests_reconcile_status_writes_do_not() -> None:
    first = body()
    assert wants_reconcile(first, None)
    seen = handled_state(first)
    assert not wants_reconcile(body(rv="11", phase="Ready"), seen)  # our own status write
    assert not wants_reconcile({**body(rv="12"), "metadata": {**body()["metadata"], "labels": {"a": "b"}}}, seen)
    assert wants_reconcile(body(generation=2, rv="13"), seen)
    assert wants_reconcile(body(rv="14", request="2026-11-28T10:00:00Z"), seen)


class Recorder:
    """The reconcile the queue runs: records each run's trigger; `outcomes` are raised in turn."""

    def __init__(self, outcomes: list[BaseException | None]) -> None:
        self.outcomes = outcomes
        self.triggers: list[Trigger] = []
        self.running = 0
        self.most_at_once = 0
        self.gate = asyncio.Event()
        self.gate.set()

    @property
    def calls(self) -> int:
        return len(self.triggers)

    async def __call__(self, key: AppKey, trigger: Trigger) -> ReconcileResult:
        self.triggers.append(trigger)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.gate.wait()
            outcome = self.outcomes.pop(0) if self.outcomes else None
            if outcome is not None:
                raise outcome
            return ReconcileResult(status={}, release=None, applied=())
        finally:
            self.running -= 1


@pytest.fixture
def clock() -> VirtualScheduler:
    return VirtualScheduler()


def make_queue(recorder: Recorder, clock: VirtualScheduler) -> ReconcileQueue:
    return ReconcileQueue(recorder, logging.getLogger("test"), scheduler=clock)


async def test_requests_during_a_run_make_exactly_one_more_run_named_by_the_first(clock: VirtualScheduler) -> None:
    recorder = Recorder([])
    queue = make_queue(recorder, clock)
    recorder.gate.clear()
    queue.submit(KEY, "event")
    await clock.settle()
    for trigger in ("drift", "poll", "rollback", "webhook", "recreate"):
        queue.submit(KEY, trigger)
    recorder.gate.set()
    await clock.settle()
    assert recorder.triggers == ["event", "drift"] and recorder.most_at_once == 1
    await queue.close()


async def test_status_only_events_do_not_queue(clock: VirtualScheduler) -> None:
    recorder = Recorder([])
    queue = make_queue(recorder, clock)
    assert queue.observe(KEY, body())
    await clock.settle()
    assert not queue.observe(KEY, body(rv="11", phase="Ready"))
    assert not queue.requested(KEY, body(rv="11"))
    assert queue.requested(KEY, body(rv="12", request="now"))
    assert queue.observe(KEY, body(rv="12", request="now"))
    await clock.settle()
    assert recorder.triggers == ["event", "event"]
    await queue.close()


async def test_temporary_errors_retry_after_their_delay_and_a_new_request_skips_the_wait(
    clock: VirtualScheduler,
) -> None:
    recorder = Recorder([TemporaryReconcileError("BlobNotFound", "later", delay=30)])
    queue = make_queue(recorder, clock)
    queue.submit(KEY, "webhook")
    await clock.settle()
    assert recorder.calls == 1 and queue.waiting_retries == 1
    await clock.advance(29.9)
    assert recorder.calls == 1
    await clock.advance(0.1)
    assert recorder.triggers == ["webhook", "webhook"] and queue.waiting_retries == 0  # a retry keeps its trigger

    recorder.outcomes = [TemporaryReconcileError("BlobNotFound", "later", delay=3600)]
    queue.submit(KEY, "event")
    await clock.settle()
    assert recorder.calls == 3 and queue.waiting_retries == 1
    queue.submit(KEY, "event")  # someone fixed it: no hour-long wait
    await clock.settle()
    assert recorder.calls == 4 and queue.waiting_retries == 0 and clock.timers == 0
    await queue.close()


async def test_permanent_errors_wait_for_a_change_and_bugs_back_off_doubling(clock: VirtualScheduler) -> None:
    recorder = Recorder([PermanentReconcileError("InvalidSpec", "bad"), RuntimeError("bug"), RuntimeError("bug")])
    queue = make_queue(recorder, clock)
    queue.submit(KEY, "event")
    await clock.settle()
    assert recorder.calls == 1 and queue.waiting_retries == 0
    queue.submit(KEY, "drift")
    await clock.settle()
    assert recorder.calls == 2 and queue.waiting_retries == 1  # the bug is retried, not raised
    await clock.advance(queue_module.UNEXPECTED_ERROR_DELAY)
    assert recorder.calls == 3  # the same bug again: the next wait is twice as long
    await clock.advance(queue_module.UNEXPECTED_ERROR_DELAY * 2 - 0.1)
    assert recorder.calls == 3
    await clock.advance(0.1)
    assert recorder.triggers == ["event", "drift", "drift", "drift"] and queue.waiting_retries == 0
    recorder.outcomes = [RuntimeError("bug")]
    queue.submit(KEY, "event")
    await clock.settle()
    queue.forget(KEY)
    assert queue.waiting_retries == 0 and clock.timers == 0
    await queue.close()


def test_the_modelapp_cache_never_goes_back_to_an_older_copy() -> None:
    cache = ModelAppCache()
    cache.observe(KEY, body(generation=2, rv="20"))
    cache.observe(KEY, body(generation=1, rv="30"))  # older spec, whatever its resourceVersion
    cache.observe(KEY, body(generation=2, rv="15"))  # a watch event that predates our own write
    assert cache.get(KEY) == body(generation=2, rv="20")
    cache.observe(KEY, body(generation=2, rv="21"))
    assert (cache.get(KEY) or {})["metadata"]["resourceVersion"] == "21"
    assert not Stored.of(body(rv="not-a-number")).is_older_than(Stored.of(body(rv="20")))  # cannot tell: new wins
    copy = cache.get(KEY)
    assert copy is not None and copy is not cache.get(KEY)  # a fresh parse each time: changing it changes nothing


def test_child_cache_prefers_our_apply_until_the_watch_catches_up() -> None:
    watched: dict[tuple[str, str, str], dict[str, Any]] = {}

    def lookup(kind: str, ns: str, name: str) -> Stored | None:
        found = watched.get((kind, ns, name))
        return Stored.of(found) if found is not None else None

    children = ChildCache(lookup)
    assert children.get("Deployment", "ns", "app") is None
    answer = {"metadata": {"generation": 2, "resourceVersion": "50", "managedFields": [{"manager": "x"}]}}
    children.applied("Deployment", "ns", "app", answer)
    watched[("Deployment", "ns", "app")] = {"metadata": {"generation": 1, "resourceVersion": "40"}}
    assert children.get("Deployment", "ns", "app") == without_managed_fields(answer)
    assert "managedFields" not in (children.get("Deployment", "ns", "app") or {})["metadata"]
    caught_up = {"metadata": {"generation": 2, "resourceVersion": "51"}, "status": {"readyReplicas": 1}}
    watched[("Deployment", "ns", "app")] = caught_up
    assert children.get("Deployment", "ns", "app") == caught_up
    children.forget("ns", "app")
    del watched[("Deployment", "ns", "app")]
    assert children.get("Deployment", "ns", "app") is None  # deleted: not answered from our old apply
    assert not ChildCache().enabled


async def test_events_are_posted_in_the_background_in_order_and_a_failure_is_dropped(clock: VirtualScheduler) -> None:
    posted: list[str] = []
    gate = asyncio.Event()

    async def post(involved: Any, type_: Any, reason: str, message: str, at: Any) -> None:
        await gate.wait()
        if reason == "Broken":
            raise RuntimeError("API server said no")
        posted.append(reason)

    recorder = EventRecorder(post, workers=1, backlog=3)
    involved = {"metadata": {"namespace": "ns", "name": "app"}}
    for reason in ("RolloutStarted", "Broken", "Ready", "Dropped?"):
        recorder.record(involved, "Normal", reason, "m")  # returns at once: nothing posted yet
    await clock.settle()
    assert posted == [] and recorder.backlog == 2 and recorder.dropped == 1  # full at 3; one taken by the worker
    gate.set()
    await recorder.close()
    assert posted == ["RolloutStarted", "Ready"]


def test_a_name_whose_apply_conflicted_is_read_from_the_api_server_once() -> None:
    children = ChildCache(lambda kind, ns, name: None)
    assert children.trusted("Deployment", "ns", "app")
    children.applied("Deployment", "ns", "app", {"metadata": {"generation": 1}})
    children.distrust("Deployment", "ns", "app")
    assert not children.trusted("Deployment", "ns", "app")  # this read GETs
    assert children.trusted("Deployment", "ns", "app")  # later ones trust the watch again
    assert children.get("Deployment", "ns", "app") is None  # our apply's answer went with the conflict


async def test_a_standby_replica_runs_no_reconcile_but_keeps_it_for_when_it_is_active(
    clock: VirtualScheduler,
) -> None:
    recorder = Recorder([])
    queue = make_queue(recorder, clock)
    active = False
    queue.set_active_check(lambda: active)
    queue.submit(KEY, "poll")
    queue.submit(OTHER, "event")
    await clock.settle()
    assert recorder.calls == 0 and queue.parked == 2 and queue.waiting_retries == 0
    assert clock.timers == 1  # one timer for all that wait, however many ModelApps the standby sees
    await clock.advance(queue_module.STANDBY_RECHECK_SECONDS * 3)
    assert recorder.calls == 0 and queue.parked == 2 and clock.timers == 1
    active = True
    await clock.advance(queue_module.STANDBY_RECHECK_SECONDS)
    assert sorted(recorder.triggers) == ["event", "poll"] and queue.parked == 0 and clock.timers == 0
    await queue.close()


async def test_a_reconcile_that_finds_the_lease_lost_writes_nothing_and_waits_for_leadership(
    clock: VirtualScheduler,
) -> None:
    recorder = Recorder([NotLeading("lost")])  # the apply guard (reconciler._must_lead) refused the write
    queue = make_queue(recorder, clock)
    leading = True
    queue.set_active_check(lambda: leading)
    queue.submit(KEY, "webhook")
    await clock.settle()
    leading = False
    await clock.advance(queue_module.STANDBY_RECHECK_SECONDS * 5)
    assert recorder.triggers == ["webhook"] and queue.parked == 1
    leading = True
    await clock.advance(queue_module.STANDBY_RECHECK_SECONDS)
    assert recorder.triggers == ["webhook", "webhook"] and queue.parked == 0
    await queue.close()
