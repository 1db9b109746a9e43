"""Push → served, with real pods: from an image push until the Service answers from the new pair.

Starts the local stack with its real node, builds the app and operator images from their
Dockerfiles, installs the operator in-cluster (`kubectl apply -k deploy/`) with its webhook
receiver, and applies one ModelApp (2 replicas) following the tag `bench`. The registry's push
notifications go to the receiver's Service; polling is set to 300 s, so only the webhook explains a
fast rollout. Each change pushes the current image plus one small new layer to the tag (what a CI
build of a code change looks like to a node) and times:

  push → served   from the moment the tag moved (manifest PUT answered) until GET /version through
                  the Service first names the new digest (polled every 20 ms from the host)
  push → Ready    until the ModelApp is Ready on the new pair (every old pod replaced)

and, for every new pod, where its start-up went (create → Ready):
  image pull      the kubelet's own figure ("Successfully pulled image ... in X")
  download+verify the app's log (pinned model version fetched and sha256-checked)
  model load      the app's log
  other           the rest: scheduling, sandbox and container start, Python start-up, probe period

    .venv/bin/python bench/push_to_served.py [--changes 20] [--out bench/out/push_to_served.json]
        [--before bench/out/push_to_served_before.json]   (the CDF draws that earlier run too)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from modelapp_localstack import Stack, images  # noqa: E402
from modelapp_localstack.demo import train_model  # noqa: E402
from modelapp_localstack.incluster import TENANT_NAMESPACE, install_operator, receiver_url  # noqa: E402
from modelapp_localstack.operator import tenant_secrets  # noqa: E402
from modelapp_localstack.registry import Registry  # noqa: E402
from modelapp_serving.publish import publish_model  # noqa: E402

NAME = "bench"
REPOSITORY = "modelapp/iris-server"
TAG = "bench"
PULLED = re.compile(r"Successfully pulled image .* in ([0-9.]+)(ms|s)")
MODEL_READY = re.compile(r"model ready: .*, ([0-9.]+) s, [0-9]+ MB/s\); loaded in ([0-9.]+) s")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _json(stack: Stack, *args: str) -> Any:
    assert stack.kube is not None
    return json.loads(stack.kube.kubectl(*args, "-o", "json").stdout)


def _version(base: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{base}/version", timeout=2) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result
    except OSError:
        return {}


def _ready_on(stack: Stack, digest: str) -> bool:
    body = _json(stack, "get", "modelapp", NAME, "-n", TENANT_NAMESPACE)
    status = body.get("status") or {}
    ready = {c["type"]: c for c in status.get("conditions") or []}.get("Ready", {})
    return bool(ready.get("status") == "True" and (status.get("image") or {}).get("digest") == digest)


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def pod_breakdown(stack: Stack, digest: str) -> list[dict[str, float]]:
    """Start-up stages of the Ready pods that run `digest`."""
    assert stack.kube is not None
    pods = _json(stack, "get", "pods", "-n", TENANT_NAMESPACE, "-l", f"app.kubernetes.io/instance={NAME}")["items"]
    events = _json(stack, "get", "events", "-n", TENANT_NAMESPACE)["items"]
    found = []
    for pod in pods:
        if not pod["spec"]["containers"][0]["image"].endswith(digest):
            continue
        conditions = {c["type"]: c for c in pod["status"].get("conditions") or []}
        if conditions.get("Ready", {}).get("status") != "True":
            continue
        total = _when(conditions["Ready"]["lastTransitionTime"]) - _when(pod["metadata"]["creationTimestamp"])
        pull = 0.0
        for event in events:
            if event["involvedObject"].get("name") == pod["metadata"]["name"] and event.get("reason") == "Pulled":
                match = PULLED.search(event.get("message", ""))
                if match:
                    pull = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
        logs = stack.kube.kubectl("logs", "-n", TENANT_NAMESPACE, pod["metadata"]["name"], check=False).stdout
        model = MODEL_READY.search(logs)
        download, load = (float(model.group(1)), float(model.group(2))) if model else (0.0, 0.0)
        found.append(
            {
                "create_to_ready": total,
                "image_pull": pull,
                "download_verify": download,
                "model_load": load,
                "other": max(0.0, total - pull - download - load),
            }
        )
    return found


def deploy_bench_app(stack: Stack, replicas: int, *, before_apply: Any = None) -> tuple[Registry, str]:
    """Start the stack's parts, build and push the images, install the operator in-cluster with its webhook
    receiver (polling at 300 s) and apply the ModelApp `bench` (`replicas` pods); wait until it is Ready.
    Returns the registry and the app image (`repository@digest`). Shared with bench/pod_start.py and
    bench/gate_switch.py (before_apply(azurite) returns spec fields to add, after the model is published)."""
    kube = stack.start_kube(nodes=1)
    assert stack.network is not None
    token = secrets.token_urlsafe(24)
    registry = stack.start_registry(notify_url=receiver_url(stack.network.service_cidr), notify_token=token)
    azurite = stack.start_azurite()
    buildah = stack.buildah()
    app = images.build_project_image(buildah, "app", registry, repository=REPOSITORY, tag=TAG)
    operator = images.build_project_image(buildah, "operator", registry, repository="modelapp/operator", tag="bench")
    install_operator(
        kube,
        registry,
        operator,
        stack.run_dir,
        receiver_token=token,
        service_cidr=stack.network.service_cidr,
        settings={"MODELAPP_POLL_INTERVAL_SECONDS": "300"},
    )
    kube.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": tenant_secrets(TENANT_NAMESPACE, registry, azurite)}
        ),
    )
    model = train_model(stack.run_dir / "model", 1)
    publish_model(
        model,
        ("models", f"{NAME}/model.onnx"),
        connection_string=azurite.connection_string,
        overwrite=True,
        progress=False,
    )
    extra: dict[str, Any] = before_apply(azurite) if before_apply is not None else {}
    kube.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "modelapp.io/v1alpha1",
                "kind": "ModelApp",
                "metadata": {"name": NAME, "namespace": TENANT_NAMESPACE},
                "spec": {
                    "image": {"repository": app.split("@")[0], "tag": TAG, "pullSecretName": "regcred"},
                    "model": {
                        "blob": {
                            "accountUrl": azurite.blob_endpoint,
                            "container": "models",
                            "name": f"{NAME}/model.onnx",
                        },
                        "credentials": {"secretRef": {"name": "storage"}},
                    },
                    "replicas": replicas,
                    "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
                    "rollout": {"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": 300},
                    **extra,
                },
            }
        ),
    )
    digest = app.split("@")[1]
    deadline = time.monotonic() + 300
    while not _ready_on(stack, digest):
        if time.monotonic() > deadline:
            raise SystemExit("the first rollout did not become Ready")
        time.sleep(1)
    return registry, app


def run(changes: int, out: Path, before: Path | None) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    stack = Stack.create(real_nodes=1)
    try:
        registry, app = deploy_bench_app(stack, replicas=2)
        digest = app.split("@")[1]
        service = _json(stack, "get", "service", NAME, "-n", TENANT_NAMESPACE)
        base = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
        served: list[float] = []
        ready: list[float] = []
        pods: list[dict[str, float]] = []
        for index in range(changes):
            digest = registry.push_variant(REPOSITORY, TAG, TAG)
            pushed = time.monotonic()
            while _version(base).get("image", "").split("@")[-1] != digest:
                if time.monotonic() - pushed > 300:
                    raise SystemExit(f"change {index}: the Service never answered from {digest}")
                time.sleep(0.02)
            served.append(time.monotonic() - pushed)
            while not _ready_on(stack, digest):
                if time.monotonic() - pushed > 400:
                    raise SystemExit(f"change {index}: never Ready on {digest}")
                time.sleep(0.2)
            ready.append(time.monotonic() - pushed)
            pods += pod_breakdown(stack, digest)
            print(f"change {index + 1}/{changes}: served {served[-1]:.2f}s, Ready {ready[-1]:.2f}s", flush=True)
        stages = ("create_to_ready", "image_pull", "download_verify", "model_load", "other")
        result = {
            "changes": changes,
            "replicas": 2,
            "push_to_served_seconds": {
                "p50": percentile(served, 0.5),
                "p99": percentile(served, 0.99),
                "min": min(served),
                "max": max(served),
                "all": served,
            },
            "push_to_ready_seconds": {"p50": percentile(ready, 0.5), "p99": percentile(ready, 0.99), "all": ready},
            "pod_start_seconds_median": {stage: statistics.median(p[stage] for p in pods) for stage in stages},
            "pods_measured": len(pods),
        }
        result["load_average_before"] = load_before
        result["load_average_after"] = list(os.getloadavg())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        _plot(served, before, out.with_suffix(".png"))
        return result
    finally:
        stack.stop()


def _plot(served: list[float], before: Path | None, path: Path) -> None:
    """CDF of push → served; with `before` (an earlier run's JSON) both curves on one plot."""
    matplotlib.use("Agg")
    figure, axes = plt.subplots(figsize=(6, 3.5))
    curves = [("now", served)]
    if before is not None and before.is_file():
        curves.insert(0, ("before", json.loads(before.read_text())["push_to_served_seconds"]["all"]))
    for label, values in curves:
        ordered = sorted(values)
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        axes.plot(ordered, fractions, drawstyle="steps-post", label=f"{label} (p50 {percentile(values, 0.5):.1f} s)")
    axes.set_xlabel("push → first answer from the new pair through the Service (s)")
    axes.set_ylabel("fraction of changes")
    axes.set_title(f"push → served, real pods, {len(served)} changes")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "push_to_served.json")
    parser.add_argument(
        "--before",
        type=Path,
        default=REPO_ROOT / "bench" / "out" / "push_to_served_before.json",
        help="an earlier run's JSON, drawn as the 'before' curve of the CDF",
    )
    args = parser.parse_args()
    result = run(args.changes, args.out, args.before)
    print(json.dumps({k: v for k, v in result.items() if k != "all"}, indent=2, default=str))


if __name__ == "__main__":
    main()
