"""Push → served with the release gate, beside the plain rolling update, in one run on real pods.

One stack, one ModelApp (2 replicas, bench/push_to_served.py's set-up) under a steady 25 requests/s of /predict
through its Service. Each change pushes a new image to the followed tag (webhook); the same ModelApp takes its
changes first with `spec.release.strategy: Rolling`, then `Gated` (a shadow check of 200 samples; drainSeconds 0),
in one run on the same machine (not alternating: turning the shadow check on and off rolls the stable pods).
A poller asks the Service's /version every 20 ms, another the ModelApp's status every 0.25 s, and times:

  push → served   until the Service first answers from the new pair
  push → Ready    until the ModelApp is Ready on the new pair
  mixed window    from the new pair's first answer to the old pair's last: how long users got either
  switch lag      from the ModelApp first reporting the new pair as serving (Rolling: Ready on it; Gated: the
                  gate Promoting it, the Service switched) to the old pair's last answer (0: none after)

    .venv/bin/python bench/gate_switch.py [--changes 20] [--samples 200] [--out bench/out/gate_switch.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from modelapp_localstack import Stack  # noqa: E402
from modelapp_localstack.incluster import TENANT_NAMESPACE  # noqa: E402

from bench.push_to_served import (  # noqa: E402
    NAME,
    REPOSITORY,
    TAG,
    _json,
    _version,
    deploy_bench_app,
    percentile,
)

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5], [5.9, 3.0, 4.2, 1.5]]
RATE = 25.0


class Load:
    """POST /predict at RATE per second through the Service until stopped; counts what failed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        body = json.dumps({"instances": ROWS}).encode()
        next_at = time.monotonic()
        while not self._stop.is_set():
            connection = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                self.failed += response.status != 200
            except (OSError, http.client.HTTPException):
                self.failed += 1
            finally:
                connection.close()
                self.sent += 1
            next_at += 1.0 / RATE
            time.sleep(max(0.0, next_at - time.monotonic()))


def set_strategy(stack: Stack, gated: dict[str, Any] | None) -> None:
    assert stack.kube is not None
    release = gated or {"strategy": "Rolling", "shadow": None, "drainSeconds": None}
    patch = {"spec": {"release": release}}
    stack.kube.kubectl("patch", "modelapp", NAME, "-n", TENANT_NAMESPACE, "--type=merge", "-p", json.dumps(patch))


def reported(stack: Stack, digest: str, gated: bool) -> tuple[bool, bool]:
    """(the ModelApp reports the new pair as serving, it is Ready on it)."""
    status = _json(stack, "get", "modelapp", NAME, "-n", TENANT_NAMESPACE).get("status") or {}
    ready_condition = {c["type"]: c for c in status.get("conditions") or []}.get("Ready", {})
    ready = ready_condition.get("status") == "True" and (status.get("image") or {}).get("digest") == digest
    gate = status.get("gate") or {}
    switched = (
        gate.get("phase") in ("Promoting", "Promoted") and (gate.get("candidate") or {}).get("imageDigest") == digest
    )
    return (switched or ready) if gated else ready, ready


def one_change(stack: Stack, registry: Any, base: str, gated: bool) -> dict[str, float]:
    old = _version(base).get("image", "").split("@")[-1]
    digest = registry.push_variant(REPOSITORY, TAG, TAG)
    pushed = time.monotonic()
    marks: dict[str, float] = {}
    done = threading.Event()

    def watch_status() -> None:
        while not done.is_set():
            says, ready = reported(stack, digest, gated)
            now = time.monotonic() - pushed
            if says:
                marks.setdefault("reported", now)
            if ready:
                marks.setdefault("ready", now)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch_status, daemon=True)
    watcher.start()
    first_new = last_old = None
    try:
        while "ready" not in marks or time.monotonic() - pushed - marks["ready"] < 3.0:  # 3 s past Ready: late answers
            now = time.monotonic() - pushed
            if now > 400:
                raise SystemExit(f"never Ready on {digest}")
            answered = _version(base).get("image", "").split("@")[-1]
            if answered == digest and first_new is None:
                first_new = now
            if answered == old:
                last_old = now
            time.sleep(0.02)
    finally:
        done.set()
        watcher.join(timeout=5)
    assert first_new is not None
    return {
        "served": first_new,
        "ready": marks["ready"],
        "mixed": max(0.0, (last_old or 0.0) - first_new),
        "switch_lag": max(0.0, (last_old or 0.0) - marks.get("reported", marks["ready"])),
    }


def summary(values: list[dict[str, float]]) -> dict[str, Any]:
    return {
        key: {"p50": percentile([v[key] for v in values], 0.5), "p99": percentile([v[key] for v in values], 0.99),
              "max": max(v[key] for v in values), "all": [round(v[key], 3) for v in values]}
        for key in values[0]
    }  # fmt: skip


def run(changes: int, samples: int, out: Path) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    stack = Stack.create(real_nodes=1)
    gated = {"strategy": "Gated", "shadow": {"minAgreement": 0.95, "minSamples": samples}, "drainSeconds": 0}
    try:
        registry, _ = deploy_bench_app(stack, replicas=2)
        service = _json(stack, "get", "service", NAME, "-n", TENANT_NAMESPACE)
        host, port = service["spec"]["clusterIP"], int(service["spec"]["ports"][0]["port"])
        base = f"http://{host}:{port}"
        measured: dict[str, list[dict[str, float]]] = {"Rolling": [], "Gated": []}
        with Load(host, port) as load:
            for strategy in ("Rolling", "Gated"):
                # Once per side: turning a shadow check on rolls the stable pods once (they get the address).
                set_strategy(stack, gated if strategy == "Gated" else None)
                time.sleep(5)
                deadline = time.monotonic() + 180
                while not reported(stack, _version(base).get("image", "").split("@")[-1], False)[1]:
                    if time.monotonic() > deadline:
                        raise SystemExit("the ModelApp did not settle after the strategy change")
                    time.sleep(0.5)
                time.sleep(5)
                for index in range(changes):
                    figures = one_change(stack, registry, base, strategy == "Gated")
                    measured[strategy].append(figures)
                    shown = ", ".join(f"{k} {v:.2f}s" for k, v in figures.items())
                    print(f"{strategy} {index + 1}/{changes}: {shown}", flush=True)
        result: dict[str, Any] = {
            "changes_per_strategy": changes, "replicas": 2, "load_requests_per_second": RATE,
            "shadow_min_samples": samples, "requests": load.sent, "failed_requests": load.failed,
        }  # fmt: skip
        result.update({strategy: summary(values) for strategy, values in measured.items()})
        result["gated_over_rolling_served_p50"] = result["Gated"]["served"]["p50"] / result["Rolling"]["served"]["p50"]
        result["load_average_before"] = load_before
        result["load_average_after"] = list(os.getloadavg())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=20, help="changes per strategy")
    parser.add_argument("--samples", type=int, default=200, help="the shadow check's minSamples")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "gate_switch.json")
    args = parser.parse_args()
    result = run(args.changes, args.samples, args.out)
    print(json.dumps({k: ({m: {q: x for q, x in f.items() if q != "all"} for m, f in v.items()}
                          if isinstance(v, dict) else v) for k, v in result.items()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
