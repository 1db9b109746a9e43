"""Scale: N ModelApps sharing images and models, operator against the no-operator floor, in one invocation.

Each side gets a fresh local stack with the same shapes: images pushed, models published, namespaces,
Secrets and the ModelApps created while nothing reconciles them. Then, with the clock started:

  - floor: a plain async client (a subprocess, as the operator is) renders the same Deployments and
    Services the operator would (its own build functions, the real digests and ETags, owner references
    kept) and server-side-applies them with the operator's concurrency (64 in flight), nothing else;
  - operator: `python -m modelapp_operator` from a cold start, as in production.

Both sides measure from that start to: every Deployment with the right digest and ETag ("Deployments
right"), every Deployment's pods ready, and (operator only) every ModelApp Ready. It reports the
operator/floor ratios, the extra time from pods ready to all ModelApps Ready, the operator's peak RSS,
registry + blob requests per poll interval (the hub's per-poll log line), CPU seconds per process and the
API server's requests by verb and resource (its own apiserver_request_total, before/after each side).

    .venv/bin/python bench/scale.py [--apps 1000] [--images 10] [--models 10] [--namespaces 10]
        [--sides floor,operator] [--poll-interval 10] [--observe-polls 3] [--timeout 1800] [--tracemalloc]

Writes bench/out/scale-<apps>.json, bench/out/scale-<apps>.png (convergence over time, both sides),
bench/out/scale-<apps>-rss.png (the operator's RSS against the ModelApps it has rolled out) and
bench/out/scale-<apps>.md. The operator's API writes per ModelApp (applies, status writes, events, by
the API server's counts) and the events of the run by who posted them are in all three. With
--tracemalloc the operator traces its allocations (bench/memprofile) and the allocation sites of its
peak go to bench/out/operator-memory-<apps>.json (its RSS is then not the operator's own: tracing
costs memory). Run it under the shared lock (it starts the stack and loads both cores).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from modelapp_operator.api.modelapp_types import parse_modelapp  # noqa: E402
from modelapp_operator.clients.kube import AiohttpKubeClient  # noqa: E402
from modelapp_operator.plan.children import build_deployment, build_service  # noqa: E402
from modelapp_operator.plan.release import Release, ResolvedImage, ResolvedModel  # noqa: E402

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
from bench.results import OUT_DIR, command_line, pyplot, write_json  # noqa: E402

FLOOR_CONCURRENCY = 64  # the operator's Dependencies.in_flight and its connection pool


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


_METRIC_LINE = re.compile(r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def apiserver_requests(api: KubeApi) -> Counter[str]:
    """The API server's own request counter, by 'VERB resource[/subresource]' (all clients)."""
    request = urllib.request.Request(api.server + "/metrics", headers={"Accept": "text/plain"})
    counts: Counter[str] = Counter()
    with urllib.request.urlopen(request, context=api._context, timeout=30) as response:
        for raw in response.read().decode().splitlines():
            match = _METRIC_LINE.match(raw)
            if match is None:
                continue
            labels = dict(_LABEL.findall(match.group(1)))
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[f"{labels.get('verb', '')} {resource}"] += int(float(match.group(2)))
    return counts


# ------------------------------------------------------------------------------------------ the floor


def floor_client(input_file: Path) -> int:
    """The floor's client process: render with the operator's own build functions, apply, nothing else."""
    work = json.loads(input_file.read_text())

    async def run() -> None:
        kube = AiohttpKubeClient.connect()
        in_flight = asyncio.Semaphore(FLOOR_CONCURRENCY)

        async def one(item: Mapping[str, Any]) -> None:
            app = parse_modelapp(item["body"])
            release = Release(image=ResolvedImage(**item["image"]), model=ResolvedModel(**item["model"]))
            async with in_flight:
                # The operator's order: the Service, then the Deployment.
                await kube.apply(build_service(app))
                await kube.apply(build_deployment(app, release))

        try:
            await asyncio.gather(*(one(item) for item in work))
        finally:
            await kube.close()

    started = time.monotonic()
    asyncio.run(run())
    print(f"floor client: applied {2 * len(work)} objects in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ one side


@dataclass
class Prepared:
    stack: Any
    api: KubeApi
    expected: dict[tuple[str, str], tuple[str, str]]
    floor_work: list[dict[str, Any]]


def prepare(args: argparse.Namespace) -> Prepared:
    # A kwok node offers 32 CPUs and 1,000 pods; a ModelApp's pod requests 100m by default: 300 per node
    # (with 900 per node, 10,000 ModelApps stopped at 4,160 pods ready on 13 nodes).
    nodes = max(args.nodes, math.ceil(args.apps * args.replicas / 300) + 1)
    stack = start_stack(notify_port=None, notify_token=None, nodes=nodes)
    try:
        kube, registry, azurite = stack.kube, stack.registry, stack.azurite
        assert kube is not None and registry is not None and azurite is not None
        api = KubeApi(kube.kubeconfig)
        container = models_container(azurite)
        images = [f"bench-scale/image-{i}" for i in range(args.images)]
        digests = {path: registry.push_random_image(path, "stable") for path in images}
        blobs = [f"scale/model-{i}.onnx" for i in range(args.models)]
        contents = {name: f"scale model {name}".encode() for name in blobs}
        etags = {name: publish_model(container, name, contents[name]) for name in blobs}
        namespaces = [f"bench-scale-{i}" for i in range(args.namespaces)]
        objects = [obj for namespace in namespaces for obj in namespace_objects(namespace, registry, azurite)]
        expected: dict[tuple[str, str], tuple[str, str]] = {}
        apps, placed = [], {}
        for index in range(args.apps):
            namespace, name = namespaces[index % len(namespaces)], f"app-{index:05d}"
            image, blob = images[index % len(images)], blobs[(index // len(images)) % len(blobs)]
            apps.append(modelapp(namespace, name, f"{registry.host}/{image}", azurite, blob, replicas=args.replicas))
            expected[(namespace, name)] = (f"{registry.host}/{image}@{digests[image]}", etags[blob])
            placed[(namespace, name)] = (image, blob)
        created = time.monotonic()
        apply_objects(kube, objects)
        apply_objects(kube, apps)
        print(f"created {args.apps} ModelApps in {time.monotonic() - created:.1f}s", file=sys.stderr)
        floor_work = []
        for body in api.items("/apis/modelapp.io/v1alpha1/modelapps"):
            meta = body["metadata"]
            image, blob = placed[(meta["namespace"], meta["name"])]
            floor_work.append(
                {
                    "body": {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")},
                    "image": {"repository": f"{registry.host}/{image}", "digest": digests[image], "tag": "stable"},
                    "model": {
                        "url": f"{azurite.blob_endpoint.rstrip('/')}/models/{blob}",
                        "version": etags[blob],
                        "sha256": hashlib.sha256(contents[blob]).hexdigest(),
                        "format": "onnx",
                    },
                }
            )
    except BaseException:
        stack.stop()
        raise
    return Prepared(stack, api, expected, floor_work)


@dataclass
class SideResult:
    side: str
    times: dict[str, float | None] = field(default_factory=dict)
    percentiles: dict[str, dict[str, float]] = field(default_factory=dict)
    curve: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, right, pods ready, Ready
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    api_requests: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    rss: list[tuple[float, int]] = field(default_factory=list)  # operator: (t, RSS KiB) per curve point


def observe(
    args: argparse.Namespace,
    prepared: Prepared,
    side: str,
    started: float,
    check_alive: Callable[[], None],
    sample: Callable[[], None],
    want_ready: bool,
) -> SideResult:
    api, expected = prepared.api, prepared.expected
    deployment_watch = Watcher(
        api,
        f"/apis/apps/v1/deployments?labelSelector={MANAGED_BY_SELECTOR}",
        lambda d: (template_of(d), deployment_ready(d)),
    )
    modelapp_watch = Watcher(api, "/apis/modelapp.io/v1alpha1/modelapps", modelapp_ready)
    deployment_watch.start()
    modelapp_watch.start()
    result = SideResult(side)
    names = ("deployments_right", "pods_ready", "modelapps_ready")
    timeline: dict[str, dict[int, float]] = {name: {} for name in names}
    done: dict[str, float] = {}
    last_print = 0.0
    try:
        while time.monotonic() - started < args.timeout:
            check_alive()
            sample()
            now = time.monotonic() - started
            deployments = deployment_watch.snapshot()
            right = sum(1 for key, (template, _) in deployments.items() if expected.get(key) == template)
            pods = sum(1 for key, (template, ready) in deployments.items() if ready and expected.get(key) == template)
            states = Counter(modelapp_watch.snapshot().values())
            counts = dict(zip(names, (right, pods, states.get("True", 0)), strict=True))
            result.curve.append((round(now, 2), right, pods, counts["modelapps_ready"]))
            for what, count in counts.items():
                for percent in (50, 90, 100):
                    if count * 100 >= percent * args.apps:
                        timeline[what].setdefault(percent, now)
                if count == args.apps:
                    done.setdefault(what, now)
            finished = "deployments_right" in done and "pods_ready" in done
            if want_ready:
                finished = finished and "modelapps_ready" in done
            if now - last_print >= 5 or finished:
                last_print = now
                print(f"{side} t={now:6.1f}s right={right} pods-ready={pods} modelapps={dict(states)}", file=sys.stderr)
            if finished:
                break
            time.sleep(0.5)
    finally:
        deployment_watch.stop()
        modelapp_watch.stop()
    result.times = {name: done.get(name) for name in names if want_ready or name != "modelapps_ready"}
    result.percentiles = {
        name: {str(p): round(t, 2) for p, t in timeline[name].items()}
        for name in names
        if want_ready or name != "modelapps_ready"
    }
    return result


def process_cpu(prepared: Prepared) -> dict[str, float]:
    cpu: dict[str, float] = {}
    for process in prepared.stack.kube.processes:
        popen = getattr(process, "popen", None)
        if popen is not None:
            cpu[process.name] = round(cpu_seconds(popen.pid), 1)
    return cpu


def run_floor(args: argparse.Namespace) -> SideResult:
    prepared = prepare(args)
    try:
        work_file = OUT_DIR / "scale" / "floor-work.json"
        work_file.parent.mkdir(parents=True, exist_ok=True)
        work_file.write_text(json.dumps(prepared.floor_work))
        before = apiserver_requests(prepared.api)
        env = {
            **os.environ,
            "KUBECONFIG": str(prepared.stack.kube.kubeconfig),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "operator"), str(REPO_ROOT / "app")]),
        }
        started = time.monotonic()
        client = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--floor-client", str(work_file)], env=env, cwd=REPO_ROOT
        )
        client_cpu: dict[str, float] = {}

        def check_alive() -> None:
            code = client.poll()
            if code not in (None, 0):
                raise RuntimeError(f"floor client exited with {code}")

        def sample() -> None:
            if client.poll() is None:
                client_cpu["floor client"] = cpu_seconds(client.pid)

        try:
            result = observe(args, prepared, "floor", started, check_alive, sample, want_ready=False)
            result.cpu_seconds = {**{k: round(v, 1) for k, v in client_cpu.items()}, **process_cpu(prepared)}
            after = apiserver_requests(prepared.api)
            result.api_requests = {k: v for k, v in sorted((after - before).items()) if v}
        finally:
            if client.poll() is None:
                client.terminate()  # not done within --timeout: the figures say so
            client.wait(timeout=60)
    finally:
        prepared.stack.stop()
    return result


def events_by_source(api: KubeApi, namespaces: int) -> dict[str, int]:
    """The run's events in the ModelApps' namespaces, by 'component reason' (each object's count of occurrences)."""
    counts: Counter[str] = Counter()
    for index in range(namespaces):
        for event in api.items(f"/api/v1/namespaces/bench-scale-{index}/events"):
            component = event.get("reportingComponent") or (event.get("source") or {}).get("component") or "?"
            occurrences = int(event.get("count") or ((event.get("series") or {}).get("count")) or 1)
            counts[f"{component} {event.get('reason')}"] += occurrences
    return dict(counts.most_common())


# The operator's own writes on a cold start, as the API server counts them (nothing else writes these).
OPERATOR_WRITES = ("APPLY deployments", "APPLY services", "PATCH modelapps", "PATCH modelapps/status")


def writes_per_app(side: SideResult, apps: int) -> dict[str, float]:
    """Per ModelApp: the operator's applies and status writes, and the events it posted (its own component's)."""
    figures = {key: round(side.api_requests.get(key, 0) / apps, 3) for key in OPERATOR_WRITES}
    events = side.extra.get("events_by_source") or {}
    figures["POST events (operator's)"] = round(
        sum(n for key, n in events.items() if key.startswith("modelapp-operator ")) / apps, 3
    )
    figures["all writes"] = round(sum(figures.values()), 3)
    return figures


def run_operator(args: argparse.Namespace) -> SideResult:
    prepared = prepare(args)
    try:
        kube, registry = prepared.stack.kube, prepared.stack.registry
        env = {"MODELAPP_POLL_INTERVAL_SECONDS": str(args.poll_interval), "MODELAPP_RECEIVER_ENABLED": "false"}
        roots: list[Path] = []
        memory_report = OUT_DIR / "scale" / f"tracemalloc-{args.apps}.json"
        if args.tracemalloc:
            memory_report.unlink(missing_ok=True)
            env["MODELAPP_BENCH_TRACEMALLOC"] = str(memory_report)
            roots.append(REPO_ROOT / "bench" / "memprofile")
        before = apiserver_requests(prepared.api)
        log = OUT_DIR / "scale" / f"operator-{args.apps}.log"
        log.unlink(missing_ok=True)
        operator = OperatorProcess.start(kube, registry, log, env, args.operator_src, extra_source_roots=roots)
        started = time.monotonic()
        rss: list[tuple[float, int]] = []  # (seconds since start, RSS KiB), one per curve point

        def sample() -> None:
            value = operator.rss_kib()
            if value:
                rss.append((round(time.monotonic() - started, 2), value))

        profiler = None
        if args.py_spy:
            profiler = subprocess.Popen(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(operator.process.pid),
                    "--rate",
                    "50",
                    "--format",
                    "raw",
                    "--output",
                    str(OUT_DIR / "scale" / f"operator-{args.apps}.collapsed.txt"),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        try:
            result = observe(args, prepared, "operator", started, operator.check_alive, sample, want_ready=True)
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT, not SIGTERM
                profiler.wait(timeout=60)
            result.cpu_seconds = {"operator": round(cpu_seconds(operator.process.pid), 1), **process_cpu(prepared)}
            after = apiserver_requests(prepared.api)
            result.api_requests = {k: v for k, v in sorted((after - before).items()) if v}
            peak_converged = operator.peak_rss_kib()
            polls_before = len(list(operator.poll_lines()))
            deadline = time.monotonic() + (args.observe_polls + 1) * args.poll_interval + 10
            while time.monotonic() < deadline and len(list(operator.poll_lines())) < polls_before + args.observe_polls:
                operator.check_alive()
                time.sleep(1.0)
            polls = list(operator.poll_lines())[polls_before:]
            result.extra = {
                "operator_peak_rss_mib_until_converged": round((peak_converged or 0) / 1024, 1),
                "operator_peak_rss_mib": round((operator.peak_rss_kib() or 0) / 1024, 1),
                "operator_rss_mib_at_end": round((operator.rss_kib() or 0) / 1024, 1),
                "poll_requests": [p[2] for p in polls],
                "poll_keys": {"images": polls[-1][0], "models": polls[-1][1]} if polls else None,
                "tracemalloc": args.tracemalloc,
                "events_by_source": events_by_source(prepared.api, args.namespaces),
            }
            result.extra["writes_per_modelapp"] = writes_per_app(result, args.apps)
            result.rss = rss
            if args.tracemalloc and memory_report.exists():
                write_json(
                    f"operator-memory-{args.apps}", json.loads(memory_report.read_text()), command=command_line()
                )
        finally:
            operator.stop()
    finally:
        prepared.stack.stop()
    return result


# ------------------------------------------------------------------------------------------ report


def ratio(operator: float | None, floor: float | None) -> float | None:
    return round(operator / floor, 3) if operator is not None and floor else None


def plot(path: Path, sides: list[SideResult], apps: int) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 5))
    styles = {"floor": "--", "operator": "-"}
    for side in sides:
        t = [point[0] for point in side.curve]
        axes.plot(
            t, [p[1] for p in side.curve], styles[side.side], color="tab:blue", label=f"{side.side}: Deployments right"
        )
        axes.plot(t, [p[2] for p in side.curve], styles[side.side], color="tab:green", label=f"{side.side}: pods ready")
        if side.side == "operator":
            axes.plot(t, [p[3] for p in side.curve], "-", color="tab:red", label="operator: ModelApps Ready")
    axes.set_xlabel("seconds since the operator (or the floor client) started")
    axes.set_ylabel(f"of {apps:,} ModelApps")
    axes.set_title(f"Convergence of {apps:,} ModelApps: operator vs no-operator floor (fresh stack each)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_rss(path: Path, operator: SideResult, apps: int) -> None:
    """The operator's RSS against the ModelApps whose Deployment it has rolled out, through the run."""
    rss_at = dict(operator.rss)
    points = [(row[1], rss_at[row[0]] / 1024) for row in operator.curve if row[0] in rss_at]
    if not points:
        return
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 5))
    axes.plot([p[0] for p in points], [p[1] for p in points], "-", color="tab:purple", label="operator RSS")
    peak = operator.extra.get("operator_peak_rss_mib")
    if peak:
        axes.axhline(peak, color="tab:purple", linestyle=":", label=f"peak (VmHWM) {peak:.0f} MiB")
    axes.set_xlabel(f"ModelApps with their Deployment right (of {apps:,})")
    axes.set_ylabel("MiB")
    axes.set_title(f"Operator RSS vs ModelApps rolled out, cold start of {apps:,}")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(args: argparse.Namespace, sides: dict[str, SideResult], command: str) -> tuple[dict[str, Any], str]:
    floor, operator = sides.get("floor"), sides.get("operator")
    ratios: dict[str, Any] = {}
    if floor is not None and operator is not None:
        ratios = {
            "deployments_right": ratio(operator.times.get("deployments_right"), floor.times.get("deployments_right")),
            "pods_ready": ratio(operator.times.get("pods_ready"), floor.times.get("pods_ready")),
        }
    extra_ready = None
    if operator is not None and operator.times.get("modelapps_ready") is not None and operator.times.get("pods_ready"):
        extra_ready = round(operator.times["modelapps_ready"] - operator.times["pods_ready"], 2)  # type: ignore[operator]
    figures = {
        "apps": args.apps,
        "images": args.images,
        "models": args.models,
        "namespaces": args.namespaces,
        "replicas": args.replicas,
        "poll_interval_s": args.poll_interval,
        "floor_concurrency": FLOOR_CONCURRENCY,
        "ratios_operator_over_floor": ratios,
        "modelapps_ready_after_pods_ready_s": extra_ready,
        "sides": {
            name: {
                "times_s": side.times,
                "percentiles_s": side.percentiles,
                "cpu_seconds": side.cpu_seconds,
                "api_requests": side.api_requests,
                **side.extra,
                "curve": {"columns": ["t_s", "deployments_right", "pods_ready", "modelapps_ready"], "rows": side.curve},
                **({"rss_kib": {"columns": ["t_s", "rss_kib"], "rows": side.rss}} if side.rss else {}),
            }
            for name, side in sides.items()
        },
    }

    def s(value: float | None) -> str:
        return f"{value:.1f} s" if value is not None else f"not within {args.timeout:.0f} s"

    lines = [
        f"## Scale: {args.apps:,} ModelApps, operator vs floor",
        "",
        f"Command: `{command}`  ",
        f"{args.apps} ModelApps ({args.replicas} replica each) in {args.namespaces} namespaces sharing {args.images} "
        f"images and {args.models} models; a fresh stack per side; poll interval {args.poll_interval:g} s.",
        "",
        "| measure | floor | operator | operator / floor |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("deployments_right", "all Deployments right"), ("pods_ready", "all pods ready")):
        f = floor.times.get(key) if floor else None
        o = operator.times.get(key) if operator else None
        lines.append(f"| {label} | {s(f)} | {s(o)} | {ratios.get(key) or '-'} |")
    if operator is not None:
        lines.append(f"| all ModelApps Ready | - | {s(operator.times.get('modelapps_ready'))} | - |")
        lines.append(f"| ModelApps Ready after pods ready | - | {extra_ready} s | - |")
        for key, value in operator.extra.items():
            if key not in ("events_by_source", "writes_per_modelapp"):
                lines.append(f"| {key} | - | {value} | - |")
        for key, value in (operator.extra.get("writes_per_modelapp") or {}).items():
            lines.append(f"| writes per ModelApp: {key} | - | {value} | - |")
    for name, side in sides.items():
        lines.append(
            f"| CPU seconds ({name}) | " + ", ".join(f"{k} {v:.0f}" for k, v in side.cpu_seconds.items()) + " | | |"
        )
    keys = sorted({k for side in sides.values() for k in side.api_requests})
    lines += [
        "",
        "API server requests during each side (all clients):",
        "",
        "| request | floor | operator |",
        "|---|---:|---:|",
    ]
    for key in keys:
        lines.append(
            f"| {key} | {floor.api_requests.get(key, 0) if floor else '-'} | "
            f"{operator.api_requests.get(key, 0) if operator else '-'} |"
        )
    if operator is not None:
        lines += ["", "Events in the ModelApps' namespaces (operator side), by who posted them:", ""]
        lines += ["| component reason | events |", "|---|---:|"]
        lines += [f"| {key} | {n} |" for key, n in (operator.extra.get("events_by_source") or {}).items()]
    return figures, "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--floor-client":
        return floor_client(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=4, help="kwok nodes (at least apps*replicas/300 + 1)")
    parser.add_argument("--sides", default="floor,operator", help="floor, operator or both (default)")
    parser.add_argument("--poll-interval", type=float, default=10.0)
    parser.add_argument("--observe-polls", type=int, default=3, help="polls to observe after convergence")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--py-spy", default="", help="py-spy binary: profile the operator (bench/out/scale/)")
    parser.add_argument("--operator-src", type=Path, default=REPO_ROOT / "operator", help="operator source root to run")
    parser.add_argument(
        "--tracemalloc", action="store_true", help="trace the operator's allocations (bench/memprofile)"
    )
    args = parser.parse_args()
    command = command_line()
    runners = {"floor": run_floor, "operator": run_operator}
    sides: dict[str, SideResult] = {}
    for name in [s.strip() for s in args.sides.split(",") if s.strip()]:
        sides[name] = runners[name](args)
    figures, text = report(args, sides, command)
    stem = f"scale-{args.apps}"
    write_json(stem, figures, command=command)
    plot(OUT_DIR / f"{stem}.png", list(sides.values()), args.apps)
    if "operator" in sides:
        plot_rss(OUT_DIR / f"{stem}-rss.png", sides["operator"], args.apps)
    (OUT_DIR / f"{stem}.md").write_text(text)
    print(text)
    operator = sides.get("operator")
    return 0 if operator is None or all(v is not None for v in operator.times.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
