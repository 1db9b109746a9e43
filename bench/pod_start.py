"""New pod, create → Ready, on the stack's real node: a ModelApp's pod against the floor, side by side.

One run, one local stack (real node: containerd + runc), the operator in-cluster (bench/push_to_served.py's
set-up) and three Deployments in the tenant namespace, each at 1 replica:

  modelapp   the ModelApp `bench`'s own Deployment, rendered by the operator;
  plain      a plain Deployment with the same pod template (same image, env, volumes, probes): the floor the
             issue names, "the same pod started by a plain Deployment";
  bare       the same image and probe settings, but the container runs a 10-line Python HTTP server that
             answers the probes at once: what the node, the runtime and one Python start cost with no app;
  period5    `plain` with the startup probe as it was before issue 23 (period 5 s, the same allowance): what
             the 1 s period buys.

Each round adds one pod per side (the ModelApp through spec.replicas, the others through `kubectl scale`),
one side at a time in an order that rotates each round, waits until it is Ready, then scales every side back
to 1 and waits until the extra pods are gone. Times are taken on the host's clock: the pod's creation, its
scheduling and Ready as a watch (`kubectl get -w`) sees them, and the container's log lines as containerd
stamps them (`kubectl logs --timestamps`, the same clock: the node is this machine). Split per pod:

  schedule         created → bound to the node
  container start  bound → the container's first log line (sandbox, runc, the interpreter(s) and gunicorn's
                   import; `bare`: its first line is printed once it listens)
  workers booted   first line → the first worker booted
  model ready      first worker booted → its "model ready" line (import, download + verify, load)
  to Ready         the model ready → the pod Ready (the startup probe's period, the kubelet's status write)

    .venv/bin/python bench/pod_start.py [--pods 40]

Writes bench/out/pod_start.json and bench/out/pod_start.png (stacked bars of the medians).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from modelapp_localstack import Stack  # noqa: E402
from modelapp_localstack.incluster import TENANT_NAMESPACE  # noqa: E402

from bench.push_to_served import MODEL_READY as MODEL_READY_FIGURES  # noqa: E402
from bench.push_to_served import NAME, deploy_bench_app  # noqa: E402
from bench.results import command_line, pyplot, write_json  # noqa: E402

SIDES = ("modelapp", "plain", "bare", "period5")
SIDE_LABEL = "benchside"
STAGES = ("schedule", "container_start", "workers_booted", "model_ready", "to_ready")
GOAL_SECONDS = 3.0
GOAL_RATIO = 1.2
# Answers the startup/readiness path and the liveness path on their ports; prints once both listen.
BARE_SERVER = """
import http.server, os, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
servers = [http.server.ThreadingHTTPServer(("0.0.0.0", int(p)), H) for p in sys.argv[1:]]
for s in servers[1:]: threading.Thread(target=s.serve_forever, daemon=True).start()
print("listening", flush=True)
servers[0].serve_forever()
"""
LOG_STAMP = re.compile(r"^(\S+) (.*)$")
BOOTING = "Booting worker"
MODEL_READY = "model ready:"


def _stamp(text: str) -> float:
    """RFC 3339 with nanoseconds (kubectl logs --timestamps) → epoch seconds."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    base = datetime.fromisoformat(whole + "+00:00").timestamp()
    return base + (float("0." + fraction) if fraction else 0.0)


@dataclass
class PodSeen:
    side: str
    created: float
    scheduled: float | None = None
    ready: float | None = None


@dataclass
class Watcher:
    """`kubectl get pods -w` in the tenant namespace: the host time each pod was first seen, bound and Ready."""

    kubectl: list[str]
    pods: dict[str, PodSeen] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        # JSON events, not a jsonpath template: kubectl's watch with a template exited (status 1) on the first
        # pod lacking a key the template names, and the benchmark then saw no pod at all.
        self.process = subprocess.Popen(
            [*self.kubectl, "get", "pods", "-n", TENANT_NAMESPACE, "-w", "--output-watch-events", "-o", "json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        decoder = json.JSONDecoder()
        buffer = ""
        for line in self.process.stdout:
            buffer += line
            if not line.startswith("}"):
                continue  # kubectl indents each event's object: only a "}" at column 0 can end one
            try:
                event = decoder.decode(buffer)
            except ValueError:
                continue  # a nested object's closing brace that happened to sit at column 0
            buffer = ""
            self._seen(event, time.time())

    def _seen(self, event: dict[str, Any], now: float) -> None:
        pod = event.get("object") or {}
        name = (pod.get("metadata") or {}).get("name", "")
        side = ((pod.get("metadata") or {}).get("labels") or {}).get(SIDE_LABEL, "")
        node = (pod.get("spec") or {}).get("nodeName")
        conditions = (pod.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        with self.lock:
            if event.get("type") == "DELETED":
                self.gone.add(name)
                return
            seen = self.pods.get(name)
            if seen is None:
                seen = self.pods[name] = PodSeen(side or "other", now)
            if node and seen.scheduled is None:
                seen.scheduled = now
            if ready and seen.ready is None:
                seen.ready = now

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def snapshot(self) -> tuple[dict[str, PodSeen], set[str]]:
        with self.lock:
            return dict(self.pods), set(self.gone)


def _kubectl(stack: Stack, *args: str, stdin: str | None = None) -> str:
    assert stack.kube is not None
    return stack.kube.kubectl(*args, input=stdin).stdout


def floor_deployments(stack: Stack) -> None:
    """Apply `plain` (the ModelApp's pod template as is) and `bare` (the same with a trivial server)."""
    rendered = json.loads(_kubectl(stack, "get", "deployment", NAME, "-n", TENANT_NAMESPACE, "-o", "json"))
    items = []
    for side in SIDES[1:]:
        template = copy.deepcopy(rendered["spec"]["template"])
        # Labels of its own: the ModelApp's Service and the operator's pod listing must not see these pods.
        template["metadata"]["labels"] = {SIDE_LABEL: side}
        container = template["spec"]["containers"][0]
        if side == "bare":
            ports = [str(port["containerPort"]) for port in container["ports"]]
            container["command"] = ["/opt/modelapp/bin/python", "-c", BARE_SERVER, *ports]
        if side == "period5":
            startup = container["startupProbe"]
            allowance = startup["periodSeconds"] * startup["failureThreshold"]
            startup.update(periodSeconds=5, failureThreshold=-(-allowance // 5))
        items.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": f"floor-{side}", "namespace": TENANT_NAMESPACE},
                "spec": {"replicas": 1, "selector": {"matchLabels": {SIDE_LABEL: side}}, "template": template},
            }
        )
    _kubectl(stack, "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def side_of(name: str, seen: PodSeen) -> str:
    """The floor's pods carry SIDE_LABEL; the ModelApp's are named after its Deployment."""
    if seen.side in SIDES[1:]:
        return seen.side
    return "modelapp" if name.startswith(f"{NAME}-") else "other"


def scale(stack: Stack, side: str, replicas: int) -> None:
    if side == "modelapp":
        patch = json.dumps({"spec": {"replicas": replicas}})
        _kubectl(stack, "patch", "modelapp", NAME, "-n", TENANT_NAMESPACE, "--type=merge", "-p", patch)
    else:
        _kubectl(stack, "scale", f"deployment/floor-{side}", "-n", TENANT_NAMESPACE, f"--replicas={replicas}")


def log_times(stack: Stack, pod: str) -> dict[str, float]:
    """Host times of the container's first line, first worker booted and first model ready."""
    assert stack.kube is not None
    text = stack.kube.kubectl("logs", "--timestamps", "-n", TENANT_NAMESPACE, pod, check=False).stdout
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = LOG_STAMP.match(line)
        if not match:
            continue
        stamp, message = _stamp(match.group(1)), match.group(2)
        found.setdefault("first_line", stamp)
        if BOOTING in message:
            found.setdefault("booted", stamp)
        if MODEL_READY in message and "model_ready" not in found:
            found["model_ready"] = stamp
            figures = MODEL_READY_FIGURES.search(message)
            if figures:
                found["download_verify_s"], found["load_s"] = float(figures.group(1)), float(figures.group(2))
    return found


def split(seen: PodSeen, logs: dict[str, float]) -> dict[str, float]:
    assert seen.scheduled is not None and seen.ready is not None
    first = logs.get("first_line", seen.scheduled)
    booted = logs.get("booted", first)
    model = logs.get("model_ready", booted)
    return {
        "create_to_ready": seen.ready - seen.created,
        "schedule": seen.scheduled - seen.created,
        "container_start": first - seen.scheduled,
        "workers_booted": booted - first,
        "model_ready": model - booted,
        "to_ready": seen.ready - model,
        # Inside "model ready", from the app's own log line: the verified download and the load.
        "download_verify": logs.get("download_verify_s", 0.0),
        "load": logs.get("load_s", 0.0),
    }


def run(pods: int) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    stack = Stack.create(real_nodes=1)
    watcher: Watcher | None = None
    try:
        deploy_bench_app(stack, replicas=1)
        floor_deployments(stack)
        assert stack.kube is not None
        watcher = Watcher([str(stack.kube.binary), "kubectl", f"--kubeconfig={stack.kube.kubeconfig}"])
        watcher.start()
        for side in SIDES[1:]:
            _kubectl(stack, "rollout", "status", f"deployment/floor-{side}", "-n", TENANT_NAMESPACE, "--timeout=120s")
        time.sleep(2)  # the watch's initial listing is in
        results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for index in range(pods):
            order = SIDES[index % len(SIDES) :] + SIDES[: index % len(SIDES)]
            for side in order:
                before, _ = watcher.snapshot()
                scale(stack, side, 2)
                deadline = time.monotonic() + 120
                while True:
                    now_pods, _ = watcher.snapshot()
                    new = [
                        (name, seen)
                        for name, seen in now_pods.items()
                        if name not in before and side_of(name, seen) == side
                    ]
                    if new and new[0][1].ready is not None and new[0][1].scheduled is not None:
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"round {index}: no new {side} pod became Ready in 120 s")
                    time.sleep(0.05)
                name, seen = new[0]
                results[side].append(split(seen, log_times(stack, name)))
            for side in SIDES:
                scale(stack, side, 1)
            _wait_one_each(stack, watcher)
            line = ", ".join(f"{side} {results[side][-1]['create_to_ready']:.2f}s" for side in SIDES)
            print(f"round {index + 1}/{pods}: {line}", flush=True)
        return summarise(results, pods, load_before)
    finally:
        if watcher is not None:
            watcher.stop()
        stack.stop()


def _wait_one_each(stack: Stack, watcher: Watcher) -> None:
    """Until every side is back to one live pod (the extra one deleted, its preStop drain done)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pods, gone = watcher.snapshot()
        live = [side_of(name, seen) for name, seen in pods.items() if name not in gone]
        if all(live.count(side) <= 1 for side in SIDES):
            return
        time.sleep(0.2)
    raise SystemExit("the extra pods were not deleted in 120 s")


def summarise(results: dict[str, list[dict[str, float]]], pods: int, load_before: list[float]) -> dict[str, Any]:
    medians = {
        side: {
            key: statistics.median(p[key] for p in runs)
            for key in ("create_to_ready", *STAGES, "download_verify", "load")
        }
        for side, runs in results.items()
    }
    modelapp, plain = medians["modelapp"]["create_to_ready"], medians["plain"]["create_to_ready"]
    return {
        "pods_per_side": pods,
        "goal_seconds": GOAL_SECONDS,
        "goal_ratio": GOAL_RATIO,
        "median_seconds": medians,
        "ratio_modelapp_over_plain": modelapp / plain,
        "ratio_modelapp_over_bare": modelapp / medians["bare"]["create_to_ready"],
        "probe_period_5s_minus_1s": medians["period5"]["create_to_ready"] - plain,
        "met": modelapp <= GOAL_SECONDS and modelapp / plain <= GOAL_RATIO,
        "p90_seconds": {
            side: sorted(p["create_to_ready"] for p in runs)[int(0.9 * (len(runs) - 1))]
            for side, runs in results.items()
        },
        "pods": results,
        "load_average_before": load_before,
    }


def markdown(figures: dict[str, Any]) -> str:
    lines = [
        "| side | create → Ready median | p90 | " + " | ".join(STAGES) + " | (download + verify) | (load) |",
        "|---|---:|---:|" + "---:|" * (len(STAGES) + 2),
    ]
    for side in SIDES:
        median = figures["median_seconds"][side]
        lines.append(
            f"| {side} | {median['create_to_ready']:.2f} s | {figures['p90_seconds'][side]:.2f} s | "
            + " | ".join(f"{median[stage]:.2f}" for stage in (*STAGES, "download_verify", "load"))
            + " |"
        )
    lines.append("")
    lines.append(
        f"modelapp / plain: **{figures['ratio_modelapp_over_plain']:.2f}**; modelapp / bare: "
        f"{figures['ratio_modelapp_over_bare']:.2f}; goal ≤ {GOAL_SECONDS:.0f} s and ≤ {GOAL_RATIO}x: "
        f"{'met' if figures['met'] else 'not met'}; the 1 s startup period saves "
        f"{figures['probe_period_5s_minus_1s']:.2f} s of the median against 5 s (period5 - plain)"
    )
    return "\n".join(lines)


def plot(figures: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.8))
    bottoms = [0.0] * len(SIDES)
    for stage in STAGES:
        values = [figures["median_seconds"][side][stage] for side in SIDES]
        axes.bar(SIDES, values, bottom=bottoms, label=stage.replace("_", " "))
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    axes.axhline(GOAL_SECONDS, color="grey", linestyle="--", linewidth=1, label=f"goal {GOAL_SECONDS:.0f} s")
    axes.set_ylabel("seconds (median of each stage)")
    axes.set_title(f"new pod create → Ready, real node, {figures['pods_per_side']} pods per side")
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=40, help="new pods per side")
    args = parser.parse_args()
    figures = run(args.pods)
    path = write_json("pod_start", figures, command=command_line())
    plot(figures, path.with_suffix(".png"))
    print(markdown(figures))


if __name__ == "__main__":
    main()
