"""Scale: 1,000 ModelApps sharing 10 images and 10 models, from a cold operator start.

Starts the local stack, pushes the images, publishes the models, creates the ModelApps (spread
over --namespaces namespaces) while no operator runs, then starts `python -m modelapp_operator`
and measures:

  - time until every Deployment exists with the right image digest and model ETag,
  - time until every ModelApp is Ready,
  - the operator's peak RSS (VmHWM from /proc/<pid>/status) and its RSS at the end,
  - requests to the registry and blob service per poll interval, from the watch hub's
    per-poll log line ("watch poll: ... N requests since last poll"), over --observe-polls
    polls after convergence. With the hub's shared cache this should be images + models (20).

    .venv/bin/python bench/scale.py [--apps 1000] [--images 10] [--models 10] [--namespaces 10]
        [--poll-interval 10] [--observe-polls 3] [--timeout 1800] [--out bench/out/scale.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.operator_stack import (  # noqa: E402
    MANAGED_BY_SELECTOR,
    KubeApi,
    OperatorProcess,
    apply_objects,
    modelapp,
    models_container,
    namespace_objects,
    publish_model,
    start_stack,
    template_of,
)


def deployment_ready(deployment: Mapping[str, Any]) -> bool:
    """The rollout of the current template is complete: every wanted replica updated and ready."""
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    return (
        int(status.get("observedGeneration") or 0) >= int(deployment["metadata"].get("generation") or 0)
        and int(status.get("updatedReplicas") or 0) == wanted
        and int(status.get("readyReplicas") or 0) == wanted
        and int(status.get("replicas") or 0) == wanted
    )


def modelapp_ready(body: Mapping[str, Any]) -> str:
    for item in (body.get("status") or {}).get("conditions") or []:
        if item.get("type") == "Ready":
            return str(item.get("status"))
    return "None"


class Watcher(KubeApi):
    """Follows one collection with a watch in a thread; keeps a small summary per object."""

    def __init__(self, api: KubeApi, path: str, summarize: Callable[[Mapping[str, Any]], Any]) -> None:
        self.__dict__.update(api.__dict__)  # same server and TLS context
        self._path = path
        self._summarize = summarize
        self._lock = threading.Lock()
        self._state: dict[tuple[str, str], Any] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch {path}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def snapshot(self) -> dict[tuple[str, str], Any]:
        with self._lock:
            return dict(self._state)

    def _run(self) -> None:
        version = ""
        while not self._stopped.is_set():
            separator = "&" if "?" in self._path else "?"
            url = f"{self.server}{self._path}{separator}watch=1&timeoutSeconds=300"
            if version:
                url += f"&resourceVersion={version}"
            try:
                request = urllib.request.Request(url, headers={"Accept": "application/json"})
                with urllib.request.urlopen(request, context=self._context, timeout=330) as response:
                    for line in response:
                        if self._stopped.is_set():
                            return
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            version = ""  # 410 Gone: start again from a fresh list
                            with self._lock:
                                self._state.clear()
                            break
                        meta = obj.get("metadata") or {}
                        version = str(meta.get("resourceVersion") or version)
                        key = (str(meta.get("namespace")), str(meta.get("name")))
                        with self._lock:
                            if event.get("type") == "DELETED":
                                self._state.pop(key, None)
                            elif event.get("type") in ("ADDED", "MODIFIED"):
                                self._state[key] = self._summarize(obj)
            except (OSError, ValueError) as error:
                print(f"watch {self._path}: {error}; again", file=sys.stderr)
                time.sleep(1.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its waited-for children) from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(value) for value in fields[11:15]) / ticks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=4, help="kwok nodes (1000 pods each at most)")
    parser.add_argument("--poll-interval", type=float, default=10.0)
    parser.add_argument("--observe-polls", type=int, default=3, help="polls to observe after convergence")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--operator-src", type=Path, default=REPO_ROOT / "operator", help="operator source root to run")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "scale.md")
    args = parser.parse_args()

    stack = start_stack(notify_port=None, notify_token=None, nodes=args.nodes)
    try:
        kube, registry, azurite = stack.kube, stack.registry, stack.azurite
        assert kube is not None and registry is not None and azurite is not None
        api = KubeApi(kube.kubeconfig)
        container = models_container(azurite)

        images = [f"bench-scale/image-{i}" for i in range(args.images)]
        digests = {path: registry.push_random_image(path, "stable") for path in images}
        blobs = [f"scale/model-{i}.onnx" for i in range(args.models)]
        etags = {name: publish_model(container, name, f"scale model {name}".encode()) for name in blobs}

        namespaces = [f"bench-scale-{i}" for i in range(args.namespaces)]
        objects = [obj for namespace in namespaces for obj in namespace_objects(namespace, registry, azurite)]
        expected: dict[tuple[str, str], tuple[str, str]] = {}
        apps = []
        for index in range(args.apps):
            namespace, name = namespaces[index % len(namespaces)], f"app-{index:05d}"
            image, blob = images[index % len(images)], blobs[(index // len(images)) % len(blobs)]
            apps.append(modelapp(namespace, name, f"{registry.host}/{image}", azurite, blob, replicas=args.replicas))
            expected[(namespace, name)] = (f"{registry.host}/{image}@{digests[image]}", etags[blob])
        created = time.monotonic()
        apply_objects(kube, objects)
        apply_objects(kube, apps)
        print(f"created {args.apps} ModelApps in {time.monotonic() - created:.1f}s", file=sys.stderr)

        env = {"MODELAPP_POLL_INTERVAL_SECONDS": str(args.poll_interval), "MODELAPP_RECEIVER_ENABLED": "false"}
        out_dir = args.out.parent / "scale"
        operator = OperatorProcess.start(kube, registry, out_dir / "operator.log", env, args.operator_src)
        started = time.monotonic()
        # Watches instead of LISTs: re-listing 1,000 Deployments and ModelApps every second
        # costs the API server (and the 2 cores the operator shares) more than the changes do.
        deployment_watch = Watcher(
            api,
            f"/apis/apps/v1/deployments?labelSelector={MANAGED_BY_SELECTOR}",
            lambda d: (template_of(d), deployment_ready(d)),
        )
        modelapp_watch = Watcher(api, "/apis/modelapp.io/v1alpha1/modelapps", modelapp_ready)
        deployment_watch.start()
        modelapp_watch.start()
        deployed_at: float | None = None
        pods_ready_at: float | None = None
        ready_at: float | None = None
        timeline: dict[str, dict[int, float]] = {"deployed": {}, "pods ready": {}, "ModelApps Ready": {}}
        rss_samples: list[int] = []
        last_print = 0.0
        try:
            while time.monotonic() - started < args.timeout and (
                deployed_at is None or ready_at is None or pods_ready_at is None
            ):
                operator.check_alive()
                rss = operator.rss_kib()
                if rss:
                    rss_samples.append(rss)
                now = time.monotonic() - started
                deployments = deployment_watch.snapshot()
                right = sum(1 for key, (template, _) in deployments.items() if expected.get(key) == template)
                pods_ready = sum(
                    1 for key, (template, ready) in deployments.items() if ready and expected.get(key) == template
                )
                states = Counter(modelapp_watch.snapshot().values())
                counts = {"deployed": right, "pods ready": pods_ready, "ModelApps Ready": states.get("True", 0)}
                for what, count in counts.items():
                    for percent in (50, 90, 100):
                        if count * 100 >= percent * args.apps:
                            timeline[what].setdefault(percent, now)
                if deployed_at is None and right == args.apps:
                    deployed_at = now
                if pods_ready_at is None and pods_ready == args.apps:
                    pods_ready_at = now
                if ready_at is None and states.get("True", 0) == args.apps:
                    ready_at = now
                if now - last_print >= 5 or (deployed_at and pods_ready_at and ready_at):
                    last_print = now
                    print(
                        f"t={now:6.1f}s deployed={right} pods-ready={pods_ready} modelapps={dict(states)} "
                        f"rss={rss} KiB",
                        file=sys.stderr,
                    )
                time.sleep(0.5)
            deployment_watch.stop()
            modelapp_watch.stop()

            cpu = {"operator": cpu_seconds(operator.process.pid)}
            for process in kube.processes:
                popen = getattr(process, "popen", None)
                if popen is not None:
                    cpu[process.name] = cpu_seconds(popen.pid)
            print("CPU seconds until converged: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()), file=sys.stderr)
            polls_before = len(list(operator.poll_lines()))
            deadline = time.monotonic() + (args.observe_polls + 1) * args.poll_interval + 10
            while time.monotonic() < deadline and len(list(operator.poll_lines())) < polls_before + args.observe_polls:
                operator.check_alive()
                time.sleep(1.0)
            polls = list(operator.poll_lines())[polls_before:]
            peak_kib = operator.peak_rss_kib()
            end_kib = operator.rss_kib()
        finally:
            operator.stop()
    finally:
        stack.stop()

    def seconds(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else f"not within {args.timeout:.0f}"

    requests = [p[2] for p in polls]
    per_poll = (
        f"{statistics.median(requests):.0f} (each: {', '.join(map(str, requests))}; keys "
        f"{polls[-1][0]} images + {polls[-1][1]} models)"
        if polls
        else "n/a (no 'watch poll:' log lines: is the watch hub wired?)"
    )
    command = shlex.join([".venv/bin/python", *sys.argv])
    lines = [
        "## Scale: shared images and models",
        "",
        f"Command: `{command}`  ",
        f"{args.apps} ModelApps ({args.replicas} replica each) in {args.namespaces} namespaces sharing "
        f"{args.images} images and {args.models} models; cold operator start; poll interval {args.poll_interval:g} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| all Deployments with the right digest and ETag | {seconds(deployed_at)} s |",
        f"| all Deployments' pods ready (readyReplicas == replicas, updated) | {seconds(pods_ready_at)} s |",
        f"| all ModelApps Ready | {seconds(ready_at)} s |",
        *(
            f"| {what}: 50 % / 90 % / 100 % | "
            + " / ".join(f"{times[p]:.1f}" if p in times else "-" for p in (50, 90, 100))
            + " s |"
            for what, times in timeline.items()
        ),
        f"| operator peak RSS (VmHWM) | {peak_kib / 1024:.0f} MiB |" if peak_kib else "| operator peak RSS | n/a |",
        f"| operator RSS at the end | {end_kib / 1024:.0f} MiB |" if end_kib else "| operator RSS at the end | n/a |",
        f"| registry + blob requests per poll interval | {per_poll} |",
        "| CPU seconds until all converged | " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) + " |",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0 if deployed_at is not None and ready_at is not None else 1


if __name__ == "__main__":
    sys.exit(main())
