"""Faults against the real stack: the operator SIGKILLed during rollouts, kube-apiserver restarted, Azurite
and the registry down for a while, and the active replica of two killed during a stream of changes.

Each test prints `CHAOS ...` lines with its figures (run with -s to see them): changes made, lost and
duplicated, extra rollouts, failover and recovery times, poll cycle times per endpoint during an outage.
MODELAPP_CHAOS_OUTAGE_SECONDS shortens the outages (default 60).
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry
from modelapp_localstack.operator import OperatorProcess, apply_crd
from modelapp_localstack.procs import free_port

from tests.cluster.helpers import App, apply, conditions, get, modelapp, prepare, wait_for, wait_ready
from tests.cluster.operator_pods import operator_namespace, stand_in_pod

pytestmark = pytest.mark.chaos

POLL_SECONDS = 2
OUTAGE_SECONDS = float(os.environ.get("MODELAPP_CHAOS_OUTAGE_SECONDS", "60"))
# Leader election for the failover test: short, as client-go allows (lease > deadline > 1.2 x retry); a killed
# leader is replaced within the lease plus a retry.
LEADER_ELECTION = {
    "MODELAPP_LEADER_ELECTION_LEASE_SECONDS": "10",
    "MODELAPP_LEADER_ELECTION_RENEW_DEADLINE_SECONDS": "7",
    "MODELAPP_LEADER_ELECTION_RETRY_SECONDS": "1",
}


def report(test: str, **figures: Any) -> None:
    print(f"CHAOS {test}: " + json.dumps(figures, sort_keys=True), flush=True)


@pytest.fixture(scope="module")
def setup(kube: KubeCluster) -> None:
    apply_crd(kube)


def operator_env(token: str, port: int, **extra: str) -> dict[str, str]:
    return {
        "MODELAPP_POLL_INTERVAL_SECONDS": str(POLL_SECONDS),
        "MODELAPP_REGISTRY_TIMEOUT_SECONDS": "1.5",
        "MODELAPP_RECEIVER_TOKEN": token,
        "MODELAPP_RECEIVER_PORT": str(port),
        "MODELAPP_RECEIVER_BIND": "127.0.0.1",
        "MODELAPP_METRICS_PORT": "0",
        **extra,
    }


def start(kube: KubeCluster, registry: Registry, log: Path, env: dict[str, str], prefix: str) -> OperatorProcess:
    return OperatorProcess.start(kube, registry, log, env, namespaces=[f"{prefix}-*"])


def remove(kube: KubeCluster, apps: list[App]) -> None:
    """Their namespaces go (a cluster-wide operator in a later test must not work on them)."""
    for app in apps:
        kube.kubectl("delete", "namespace", app.namespace, "--wait=false", "--ignore-not-found")


def apps_with_operator(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, prefix: str, count: int = 3
) -> list[App]:
    apps = [prepare(kube, registry, azurite, models, prefix=prefix) for _ in range(count)]
    for app in apps:
        apply(kube, modelapp(app, azurite, replicas=1))
    return apps


def push(registry: Registry, app: App) -> str:
    return registry.push_random_image(f"apps/{app.namespace}", "stable")


def revision(kube: KubeCluster, app: App) -> int:
    deployment = get(kube, "deployment", app) or {}
    return int(
        ((deployment.get("metadata") or {}).get("annotations") or {}).get("deployment.kubernetes.io/revision", 0)
    )


def converged(kube: KubeCluster, apps: list[App], newest: dict[str, str]) -> bool:
    for app in apps:
        body = get(kube, "modelapp", app) or {}
        status = body.get("status") or {}
        ready = conditions(body).get("Ready") or {}
        if (status.get("image") or {}).get("digest") != newest[app.namespace] or ready.get("status") != "True":
            return False
    return True


def applied(kube: KubeCluster, apps: list[App], newest: dict[str, str]) -> bool:
    for app in apps:
        deployment = get(kube, "deployment", app) or {}
        containers = (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
        if not containers or not str(containers[0].get("image", "")).endswith(newest[app.namespace]):
            return False
    return True


def wait_converged(
    kube: KubeCluster, apps: list[App], newest: dict[str, str], operator: OperatorProcess, timeout: float = 120
) -> float:
    started = time.monotonic()
    try:
        wait_for("every ModelApp on its newest image", lambda: converged(kube, apps, newest), operator, timeout, 0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- where each stands ---\n{standing(kube, apps, newest)}") from None
    return time.monotonic() - started


def standing(kube: KubeCluster, apps: list[App], newest: dict[str, str]) -> str:
    """Each ModelApp's recorded pair and conditions beside its Deployment's rollout, for a failure's message:
    tells an operator that missed a change from a controller manager or kwok still catching up."""
    lines = []
    for app in apps:
        body = get(kube, "modelapp", app) or {}
        deployment = get(kube, "deployment", app) or {}
        lines.append(
            json.dumps(
                {
                    "app": app.namespace,
                    "wanted": newest[app.namespace][-12:],
                    "status.image": str(((body.get("status") or {}).get("image") or {}).get("digest"))[-12:],
                    "conditions": {k: [v.get("status"), v.get("reason")] for k, v in conditions(body).items()},
                    "deployment.generation": (deployment.get("metadata") or {}).get("generation"),
                    "deployment.status": {
                        k: v for k, v in (deployment.get("status") or {}).items() if k != "conditions"
                    },
                }
            )
        )
    return "\n".join(lines)


def verdict(kube: KubeCluster, apps: list[App], newest: dict[str, str], changes: Counter[str]) -> dict[str, int]:
    """Lost changes, duplicated history pairs and rollouts beyond one per change (plus the first)."""
    lost = duplicated = extra = 0
    for app in apps:
        status = (get(kube, "modelapp", app) or {}).get("status") or {}
        lost += (status.get("image") or {}).get("digest") != newest[app.namespace]
        pairs = [(h["imageDigest"], h["modelVersion"]) for h in status.get("history") or []]
        duplicated += len(pairs) - len(set(pairs))
        extra += max(0, revision(kube, app) - 1 - changes[app.namespace])
    return {"changes": sum(changes.values()), "lost": lost, "duplicated_pairs": duplicated, "extra_rollouts": extra}


def test_operator_sigkilled_during_rollouts_loses_and_duplicates_nothing(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    registry_notify_port: int,
    registry_notify_token: str,
    setup: None,
    tmp_path: Path,
) -> None:
    prefix = f"ck-{uuid.uuid4().hex[:4]}"
    apps = apps_with_operator(kube, registry, azurite, models, prefix)
    env = operator_env(registry_notify_token, registry_notify_port)
    log = tmp_path / "operator.log"
    operator = start(kube, registry, log, env, prefix)
    try:
        for app in apps:
            wait_ready(kube, app, operator)
        newest = {app.namespace: app.digest for app in apps}
        changes: Counter[str] = Counter()
        rng = random.Random(1212)  # noqa: S311 - reproducible timing, not secrets
        kills = 0
        for i in range(21):
            app = apps[i % len(apps)]
            newest[app.namespace] = push(registry, app)
            changes[app.namespace] += 1
            time.sleep(rng.uniform(0.2, 2.5))  # before, during or after its reconcile and rollout
            operator.kill()
            kills += 1
            operator = start(kube, registry, log, env, prefix)
        seconds = wait_converged(kube, apps, newest, operator)
        figures = verdict(kube, apps, newest, changes)
        report("sigkill", kills=kills, converged_after_last_kill_s=round(seconds, 1), **figures)
        assert figures["lost"] == 0 and figures["duplicated_pairs"] == 0 and figures["extra_rollouts"] == 0
        assert kills >= 20
    finally:
        operator.stop()
        remove(kube, apps)
    assert registry.password not in log.read_text() and registry_notify_token not in log.read_text()


def test_apiserver_restarted_during_rollouts_operator_resumes_and_misses_nothing(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    registry_notify_port: int,
    registry_notify_token: str,
    setup: None,
    tmp_path: Path,
) -> None:
    prefix = f"ca-{uuid.uuid4().hex[:4]}"
    apps = apps_with_operator(kube, registry, azurite, models, prefix)
    operator = start(
        kube, registry, tmp_path / "operator.log", operator_env(registry_notify_token, free_port()), prefix
    )
    try:
        for app in apps:
            wait_ready(kube, app, operator)
        newest = {app.namespace: app.digest for app in apps}
        changes: Counter[str] = Counter()
        recoveries: list[float] = []
        ready: list[float] = []
        apiserver = kube.process("kube-apiserver")
        for round_ in range(2):
            for app in apps:  # rollouts under way when the API server goes
                newest[app.namespace] = push(registry, app)
                changes[app.namespace] += 1
            time.sleep(0.5)
            apiserver.kill()
            # A change while the API server is down: the operator sees it, cannot write, must not forget it.
            app = apps[round_]
            newest[app.namespace] = push(registry, app)
            changes[app.namespace] += 1
            time.sleep(3)
            apiserver.start()
            apiserver.wait_ready(kube.api_ready, 90, "/readyz after a restart")
            back = time.monotonic()
            # The operator resumed: every Deployment's template names the newest image (its job done) ...
            wait_for("the newest images applied", lambda: applied(kube, apps, newest), operator, 60, 0.2)
            recoveries.append(time.monotonic() - back)
            # ... and the rollouts finish once the controller manager and kwok are back too (client-go's
            # reflectors retry with a backoff of up to 30 s each, so this bound is theirs more than ours).
            ready.append(time.monotonic() - back + wait_converged(kube, apps, newest, operator, timeout=180))
        figures = verdict(kube, apps, newest, changes)
        report("apiserver-restart", restarts=2, operator_resumed_s=[round(s, 1) for s in recoveries],
               all_ready_s=[round(s, 1) for s in ready], **figures)  # fmt: skip
        assert max(recoveries) <= 30
        assert figures["lost"] == 0 and figures["duplicated_pairs"] == 0 and figures["extra_rollouts"] == 0
        operator.check_alive()
    finally:
        operator.stop()
        remove(kube, apps)


_CYCLE = re.compile(r"watch poll of (\S+ \S+): \d+ keys, (\d+) errors.*?, in ([\d.]+)s, ([\d.]+)s after the previous")


def cycles(text: str) -> dict[str, list[tuple[int, float, float]]]:
    """endpoint -> [(errors, cycle seconds, seconds since its previous cycle)] from the operator's log."""
    found: dict[str, list[tuple[int, float, float]]] = {}
    for endpoint, errors, seconds, since in _CYCLE.findall(text):
        found.setdefault(endpoint, []).append((int(errors), float(seconds), float(since)))
    return found


def all_say(kube: KubeCluster, apps: list[App], condition: str, status: str, reason: str | None = None) -> bool:
    for app in apps:
        found = conditions(get(kube, "modelapp", app) or {})
        wanted, degraded = found.get(condition) or {}, found.get("Degraded") or {}
        if wanted.get("status") != status or (reason is not None and wanted.get("reason") != reason):
            return False
        if (degraded.get("status") == "True") != (status == "False"):
            return False
    return True


def test_azurite_then_the_registry_down_status_says_why_no_rollout_and_recovery_by_itself(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    registry_notify_token: str,
    setup: None,
    tmp_path: Path,
) -> None:
    prefix = f"co-{uuid.uuid4().hex[:4]}"
    apps = apps_with_operator(kube, registry, azurite, models, prefix)
    log = tmp_path / "operator.log"
    operator = start(kube, registry, log, operator_env(registry_notify_token, free_port()), prefix)
    try:
        for app in apps:
            wait_ready(kube, app, operator)
        revisions = {app.namespace: revision(kube, app) for app in apps}
        for name, component, condition, reason, endpoint_kind in (
            ("azurite", azurite, "ModelResolved", "StorageUnavailable", "storage"),
            ("registry", registry, "ImageResolved", "RegistryUnavailable", "registry"),
        ):
            offset = len(log.read_text())
            down = time.monotonic()
            outage = threading.Thread(target=component.stop_for, args=(OUTAGE_SECONDS,))
            outage.start()
            says_why = functools.partial(all_say, kube, apps, condition, "False", reason)
            wait_for(f"every ModelApp says {reason}", says_why, operator, OUTAGE_SECONDS, 0.2)
            detected = time.monotonic() - down
            outage.join()
            back = time.monotonic()
            recovers = functools.partial(all_say, kube, apps, condition, "True")
            wait_for(f"every ModelApp recovers from {reason}", recovers, operator, 60, 0.2)
            recovered = time.monotonic() - back
            assert {app.namespace: revision(kube, app) for app in apps} == revisions, "a rollout during an outage"
            polled = cycles(log.read_text()[offset:])
            during = {
                endpoint: {
                    "cycles": len(found),
                    "failing_cycles": sum(1 for errors, _, _ in found if errors),
                    "gap_p50_s": round(statistics.median(since for _, _, since in found), 2),
                    "gap_max_s": round(max(since for _, _, since in found), 2),
                    "cycle_max_s": round(max(seconds for _, seconds, _ in found), 3),
                }
                for endpoint, found in polled.items()
            }
            report(f"{name}-down", outage_s=OUTAGE_SECONDS, status_says_why_after_s=round(detected, 1),
                   recovered_after_s=round(recovered, 1), poll_cycles=during)  # fmt: skip
            assert detected <= 2 * POLL_SECONDS + 2  # one poll interval, plus the reconcile that writes it
            healthy = [stats for endpoint, stats in during.items() if not endpoint.startswith(endpoint_kind)]
            assert healthy and all(stats["gap_max_s"] <= POLL_SECONDS * 1.5 for stats in healthy), during
    finally:
        operator.stop()
        remove(kube, apps)


@pytest.fixture
def lease_namespace(kube: KubeCluster) -> Iterator[str]:
    """The operators' own namespace, with the Lease they elect one active with and their (stand-in) pods."""
    name = operator_namespace(kube, f"chaos-{uuid.uuid4().hex[:6]}")
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def test_failover_active_replica_killed_during_a_stream_of_changes(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    registry_notify_port: int,
    registry_notify_token: str,
    setup: None,
    lease_namespace: str,
    tmp_path: Path,
) -> None:
    prefix = f"cf-{uuid.uuid4().hex[:4]}"
    apps = apps_with_operator(kube, registry, azurite, models, prefix)
    port_b = free_port()

    def cluster_wide(log: Path, pod: str, port: int) -> OperatorProcess:
        # Each replica is a pod of the Lease's namespace (a stand-in: the standby forwards to its IP and port).
        stand_in_pod(kube, lease_namespace, pod, port)
        election = {"MODELAPP_LEADER_ELECTION": "modelapp-operator", "MODELAPP_POD_NAMESPACE": lease_namespace}
        env = operator_env(registry_notify_token, port, MODELAPP_POD_NAME=pod, **election, **LEADER_ELECTION)
        return OperatorProcess.start(kube, registry, log, env)

    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    first = cluster_wide(log_a, "operator-a", registry_notify_port)  # the registry's webhooks go to this port
    second: OperatorProcess | None = None
    again: OperatorProcess | None = None
    try:
        wait_for("the first replica active", lambda: "is now active" in first.log_text(), first, 60, 0.2)
        second = cluster_wide(log_b, "operator-b", port_b)
        for app in apps:
            wait_ready(kube, app, first)
        newest = {app.namespace: app.digest for app in apps}
        changes: Counter[str] = Counter()
        killed_at = 0.0
        took_over: list[float] = []

        def watch_takeover() -> None:
            while not took_over and time.monotonic() - killed_at < 60:
                if second is not None and "is now active" in second.log_text():
                    took_over.append(time.monotonic() - killed_at)
                time.sleep(0.1)

        for i in range(18):
            app = apps[i % len(apps)]
            newest[app.namespace] = push(registry, app)
            changes[app.namespace] += 1
            if i == 5:
                assert "is now active" not in second.log_text()  # the standby stood by
                first.kill()
                killed_at = time.monotonic()
                threading.Thread(target=watch_takeover, daemon=True).start()
            if i == 9:
                # The killed replica comes back (a new pod) on the webhook port: now the standby, it forwards them.
                again = cluster_wide(tmp_path / "a-again.log", "operator-a2", registry_notify_port)
            time.sleep(1.0)
        seconds = wait_converged(kube, apps, newest, second)
        figures = verdict(kube, apps, newest, changes)
        report("failover", failover_s=round(took_over[0], 1) if took_over else None,
               converged_after_stream_s=round(seconds, 1), **figures)  # fmt: skip
        assert took_over and took_over[0] <= 15
        assert figures["lost"] == 0 and figures["duplicated_pairs"] == 0 and figures["extra_rollouts"] == 0
        assert again is not None and "is now active" not in again.log_text()  # it rejoined as the standby
    finally:
        for process in (first, second, again):
            if process is not None:
                process.stop()
