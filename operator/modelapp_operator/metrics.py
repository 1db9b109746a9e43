"""The operator's Prometheus metrics (prometheus-client), served on their own port at /metrics.

One `OperatorMetrics` holds every metric in its own registry; `METRICS` is the process's. The rest
of the operator calls a handful of small methods here (reconcile tracking, status observed, rollout
applied, upstream request, change learned, webhook request), so the instrumentation stays one line
where it happens. Label values are bounded: no digests, no ModelApp names, no URLs; registry hosts
and storage account names are the endpoints an operator is configured to reach.

Change → Ready: the watch hub reports each followed tag or blob that moved (`change_learned`: the
app, which side, the new version, and the `Source` of the fetch that learned it, passed along as an
argument); when a status the operator writes shows Ready=True with that version on that side, the
time since the first of those changes is observed once, and the records are dropped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from modelapp_contract.blob import normalize_etag
from modelapp_operator.names import ConditionType
from modelapp_operator.plan.history import deployed_pair
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

AppKey = tuple[str, str]
# Who asked a registry or blob service, and so how a change was learned: the poll loop, a webhook's
# notification, or a reconcile's own read (the `trigger` label). Callers pass it; nothing reads it
# from the task's context.
Source = Literal["poll", "webhook", "reconcile"]
Side = Literal["image", "model"]

PROMETHEUS_CONDITIONS = (ConditionType.READY, ConditionType.DEGRADED)
CONDITION_STATUSES = ("True", "False", "Unknown")
ROLLOUT_CAUSES = ("initial", "image", "model", "both", "spec", "rollback")
WEBHOOK_SOURCES = ("acr", "registry", "eventgrid", "cloudevents")
UNEXPECTED_REASON = "Unexpected"
# A change not Ready within this long is dropped (superseded, failed, or the app changed its spec).
CHANGE_RECORD_MAX_AGE_SECONDS = 3600.0

RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
POLL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CHANGE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


class Endpoint(Protocol):
    """A watch key as metrics see it (watch/keys.py ImageKey, ModelKey)."""

    @property
    def kind(self) -> str: ...

    @property
    def endpoint(self) -> str: ...


@dataclass(frozen=True)
class _Change:
    side: Side
    version: str
    learned_at: float
    source: Source


class ReconcileTracking:
    """One reconcile: waiting for a slot, then running; errors counted by reason."""

    def __init__(self, metrics: OperatorMetrics) -> None:
        self._metrics = metrics
        self._started_at: float | None = None

    def started(self) -> None:
        self._metrics.reconciles_waiting.dec()
        self._metrics.reconciles_in_flight.inc()
        self._started_at = time.monotonic()

    def finished(self, error: BaseException | None) -> None:
        metrics = self._metrics
        if self._started_at is None:
            metrics.reconciles_waiting.dec()
            return
        metrics.reconciles_in_flight.dec()
        metrics.reconcile_duration.observe(time.monotonic() - self._started_at)
        metrics.reconciles.inc()
        if isinstance(error, Exception):
            reason = getattr(error, "reason", None)
            metrics.reconcile_errors.labels(reason if isinstance(reason, str) else UNEXPECTED_REASON).inc()


class OperatorMetrics:
    """Every metric the operator exports, in one registry (tests build their own).

    Only the event loop calls the methods; the scrape thread reads the metrics, which lock themselves."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        r = self.registry
        p = "modelapp_operator_"
        self.reconciles = Counter(p + "reconciles", "Reconciles run, whatever asked for them.", registry=r)
        self.reconcile_errors = Counter(
            p + "reconcile_errors", "Reconciles that ended in an error, by condition reason.", ["reason"], registry=r
        )
        self.reconcile_duration = Histogram(
            p + "reconcile_duration_seconds", "Time one reconcile took once it held its slot.",
            buckets=RECONCILE_BUCKETS, registry=r,
        )  # fmt: skip
        self.reconciles_in_flight = Gauge(p + "reconciles_in_flight", "Reconciles running now.", registry=r)
        self.reconciles_waiting = Gauge(
            p + "reconciles_waiting", "Reconciles waiting for a slot (queue depth).",
            registry=r,
        )  # fmt: skip
        self.rollouts_started = Counter(
            p + "rollouts_started", "Rollouts started (a new pod template applied), by cause.", ["cause"], registry=r
        )
        self.rollouts_completed = Counter(
            p + "rollouts_completed", "Rollouts that reached Ready, by cause.", ["cause"], registry=r
        )
        self.rollouts_rolled_back = Counter(
            p + "rollouts_rolled_back", "Rollouts rolled back after missing their progress deadline, by cause.",
            ["cause"], registry=r,
        )  # fmt: skip
        self.gate_results = Counter(
            p + "gate_results", "Release gate verdicts on candidate pairs: passed, rejected, aborted, overridden "
            "(promoted by hand).", ["result"], registry=r,
        )  # fmt: skip
        self.change_to_ready = Histogram(
            p + "change_to_ready_seconds",
            "From the moment the operator learned of a new image digest or model version (webhook, poll, or a "
            "reconcile's own read) until the ModelApp was Ready with it.",
            ["trigger"], buckets=CHANGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.poll_duration = Histogram(
            p + "poll_duration_seconds", "Time one poll cycle over every followed tag and blob took.",
            buckets=POLL_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_requests = Counter(
            p + "upstream_requests", "Requests to registries (kind registry, endpoint host) and blob services "
            "(kind storage, endpoint account name), by trigger (poll, webhook, reconcile).",
            ["kind", "endpoint", "trigger"], registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            p + "upstream_errors", "Failed requests to registries and blob services (same labels as the requests).",
            ["kind", "endpoint", "trigger"], registry=r,
        )  # fmt: skip
        self.webhook_requests = Counter(
            p + "webhook_requests",
            "Webhook requests by source (acr, registry, eventgrid, cloudevents) and HTTP status.",
            ["source", "status"], registry=r,
        )  # fmt: skip
        self.modelapps = Gauge(
            p + "modelapps", "ModelApps by the status of their Ready and Degraded conditions, as last written.",
            ["condition", "status"], registry=r,
        )  # fmt: skip
        self.active = Gauge(
            p + "active", "1 when this replica reconciles (the leader, or the only replica); 0 on standby.", registry=r
        )
        for condition in PROMETHEUS_CONDITIONS:
            for status in CONDITION_STATUSES:
                self.modelapps.labels(condition, status).set(0)
        self._states: dict[AppKey, tuple[str, str]] = {}
        self._rollouts: dict[AppKey, str] = {}  # app -> cause of the rollout not yet Ready
        self._changes: dict[AppKey, dict[Side, _Change]] = {}

    # --- reconciles ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reconcile(self) -> Iterator[ReconcileTracking]:
        """`with METRICS.reconcile() as tracked: async with slot: tracked.started(); ...`"""
        self.reconciles_waiting.inc()
        tracking = ReconcileTracking(self)
        try:
            yield tracking
        except BaseException as error:
            tracking.finished(error)
            raise
        tracking.finished(None)

    # --- rollouts and state ----------------------------------------------------------------------

    def rollout_applied(
        self,
        app: AppKey,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        *,
        rollback: bool = False,
    ) -> None:
        """A Deployment was applied: a rollout started when its pod template changed."""
        if after is None or (before is not None and _template(before) == _template(after)):
            return
        cause = _cause(before, after)
        if rollback:
            self.rollouts_rolled_back.labels(cause).inc()
            cause = "rollback"
        self.rollouts_started.labels(cause).inc()
        self._rollouts[app] = cause

    def gate_result(self, result: str) -> None:
        """The release gate decided on a candidate (plan/gate.py GateDecision.result)."""
        self.gate_results.labels(result).inc()

    def status_observed(self, app: AppKey, status: Mapping[str, Any]) -> None:
        """A status the operator computed for app (written or unchanged): state gauges, completed
        rollouts and change → Ready."""
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}
        ready, degraded = (_status_of(conditions.get(t)) for t in PROMETHEUS_CONDITIONS)
        self._set_state(app, (ready, degraded))
        if ready != "True":
            return
        cause = self._rollouts.pop(app, None)
        matched = self._ready_changes(app, status)
        if cause is not None:
            self.rollouts_completed.labels(cause).inc()
        if matched:
            first = min(matched, key=lambda change: change.learned_at)
            self.change_to_ready.labels(first.source).observe(max(0.0, self._clock() - first.learned_at))

    def _set_state(self, app: AppKey, state: tuple[str, str] | None) -> None:
        previous = self._states.pop(app, None)
        if previous is not None:
            for condition, value in zip(PROMETHEUS_CONDITIONS, previous, strict=True):
                self.modelapps.labels(condition, value).dec()
        if state is not None:
            self._states[app] = state
            for condition, value in zip(PROMETHEUS_CONDITIONS, state, strict=True):
                self.modelapps.labels(condition, value).inc()

    def forget(self, app: AppKey) -> None:
        """The ModelApp is gone."""
        self._set_state(app, None)
        self._rollouts.pop(app, None)
        self._changes.pop(app, None)

    # --- change → Ready ----------------------------------------------------------------------------

    def change_learned(self, apps: Iterable[AppKey], side: Side, version: str, source: Source) -> None:
        """These apps follow a tag or blob that now shows `version` (first seen by them), learned by `source`."""
        now = self._clock()
        for app in apps:
            changes = self._changes.setdefault(app, {})
            known = changes.get(side)
            if known is None or known.version != version:
                # A newer version of the same side supersedes the older one, which can never be Ready.
                changes[side] = _Change(side, version, now, source)

    def _ready_changes(self, app: AppKey, status: Mapping[str, Any]) -> list[_Change]:
        changes = self._changes.get(app)
        if not changes:
            return []
        running: dict[Side, str] = {
            "image": str((status.get("image") or {}).get("digest") or ""),
            "model": normalize_etag(str((status.get("model") or {}).get("version") or "")),
        }
        now = self._clock()
        matched = [change for change in changes.values() if running[change.side] == change.version]
        for side, change in list(changes.items()):
            if change in matched or now - change.learned_at > CHANGE_RECORD_MAX_AGE_SECONDS:
                del changes[side]
        if not changes:
            del self._changes[app]
        return matched

    def pending_changes(self, app: AppKey) -> int:
        return len(self._changes.get(app, {}))

    # --- upstream and webhooks -----------------------------------------------------------------------

    def upstream_request(self, key: Endpoint, failed: bool, source: Source) -> None:
        labels = (key.kind, key.endpoint, source)
        self.upstream_requests.labels(*labels).inc()
        if failed:
            self.upstream_errors.labels(*labels).inc()

    def webhook_request(self, source: str, status: int) -> None:
        self.webhook_requests.labels(source, str(status)).inc()

    def set_active(self, active: bool) -> None:
        """Whether this replica is the one reconciling (runtime sets 1 at start; leader election may flip it)."""
        self.active.set(1 if active else 0)


def _template(deployment: Mapping[str, Any]) -> Any:
    return (deployment.get("spec") or {}).get("template")


def _cause(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str:
    if before is None:
        return "initial"
    old, new = deployed_pair(before), deployed_pair(after)
    if old is None or new is None:
        return "spec"
    image, model = old[0] != new[0], old[1] != new[1]
    return {(True, True): "both", (True, False): "image", (False, True): "model"}.get((image, model), "spec")


def _status_of(condition: Mapping[str, Any] | None) -> str:
    value = (condition or {}).get("status")
    return value if value in CONDITION_STATUSES else "Unknown"


def serve(metrics: OperatorMetrics, port: int, bind: str) -> int:
    """Serve /metrics on a thread of its own (it answers even while the event loop is busy); the bound port."""
    server, _thread = start_http_server(port, addr=bind, registry=metrics.registry)
    return int(server.server_port)


METRICS = OperatorMetrics()
