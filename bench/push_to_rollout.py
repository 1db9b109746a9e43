"""Push-to-rollout latency: from a new image digest or model version to the Deployment's pod template.

Starts the local stack (Kubernetes with kwok nodes, the TLS registry, Azurite) and the operator
as a subprocess (`python -m modelapp_operator`), creates one ModelApp, then makes changes one at
a time and times each until the Deployment's pod template carries the new digest / ETag:

  receiver  the registry's push notification (distribution webhook) reaches the operator's
            receiver; for models the bench posts the Event Grid `BlobCreated` event that Azure
            would send (Azurite has no Event Grid). The poll interval is set long (300 s) so
            only the receiver can explain a fast rollout.
  polling   no receiver; the hub polls every --poll-interval seconds. Expect about
            interval / 2 on average plus the reconcile.

Clocks start when the tag has moved (push_random_image returned) or the blob upload returned.
In polling mode each change waits a random phase of the poll interval first (else every change
would land just after a poll). Also checks coalescing: an image and a model changed back to back
(--pairs) must each make exactly one rollout (the Deployment's revision moves by one).

    .venv/bin/python bench/push_to_rollout.py [--changes 50] [--modes receiver,polling]
        [--poll-interval 10] [--pairs 5] [--coalesce 0.2] [--out bench/out/push_to_rollout.md]
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shlex
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from modelapp_localstack import Azurite, KubeCluster, Registry  # noqa: E402
from modelapp_localstack.procs import free_port  # noqa: E402

from bench.operator_stack import (  # noqa: E402
    KubeApi,
    OperatorProcess,
    apply_objects,
    modelapp,
    models_container,
    namespace_objects,
    percentile,
    publish_model,
    start_stack,
    template_of,
    wait_for,
)


@dataclass
class Series:
    path: str  # receiver | polling
    kind: str  # image | model
    seconds: list[float] = field(default_factory=list)

    def row(self) -> str:
        values = self.seconds
        if not values:
            return f"| {self.path} | {self.kind} | 0 | - | - | - |"
        return (
            f"| {self.path} | {self.kind} | {len(values)} | {percentile(values, 0.5):.3f} | "
            f"{percentile(values, 0.99):.3f} | {max(values):.3f} |"
        )


@dataclass
class PairResult:
    path: str
    pairs: int
    rollouts: list[int] = field(default_factory=list)  # Deployment revisions per pair; 1 is right


def post_blob_created(port: int, token: str, blob_url: str, etag: str, account: str) -> None:
    """What Event Grid would deliver for a blob upload (Event Grid schema)."""
    event = {
        "topic": f"/subscriptions/bench/resourceGroups/bench/providers/Microsoft.Storage/storageAccounts/{account}",
        "subject": "/blobServices/default/containers/models/blobs/" + blob_url.split("/models/", 1)[1],
        "eventType": "Microsoft.Storage.BlobCreated",
        "id": str(uuid.uuid4()),
        "eventTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {"api": "PutBlob", "eTag": etag.strip('"'), "blobType": "BlockBlob", "url": blob_url},
        "dataVersion": "",
        "metadataVersion": "1",
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/webhooks/eventgrid",
        data=json.dumps([event]).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@dataclass
class Parts:
    kube: KubeCluster
    registry: Registry
    azurite: Azurite
    api: KubeApi


def run_mode(
    path: str, args: argparse.Namespace, parts: Parts, receiver_port: int, token: str, out_dir: Path
) -> tuple[list[Series], PairResult]:
    kube, registry, azurite, api = parts.kube, parts.registry, parts.azurite, parts.api
    models = models_container(azurite)
    namespace = f"bench-p2r-{path}-{uuid.uuid4().hex[:6]}"
    repo_path = f"bench/{namespace}"
    repository = f"{registry.host}/{repo_path}"
    blob_name = f"{namespace}/model.onnx"
    blob_url = f"{azurite.blob_endpoint}/models/{blob_name}"
    apply_objects(kube, namespace_objects(namespace, registry, azurite))
    digest = registry.push_random_image(repo_path, "stable")
    etag = publish_model(models, blob_name, b"model v0 " + secrets.token_bytes(8))

    env = {
        "MODELAPP_POLL_INTERVAL_SECONDS": str(args.poll_interval if path == "polling" else 300),
        "MODELAPP_CHANGE_COALESCE_SECONDS": str(args.coalesce),
    }
    if path == "receiver":
        env |= {
            "MODELAPP_RECEIVER_TOKEN": token,
            "MODELAPP_RECEIVER_PORT": str(receiver_port),
            "MODELAPP_RECEIVER_BIND": "127.0.0.1",
        }
    else:
        env["MODELAPP_RECEIVER_ENABLED"] = "false"
    operator = OperatorProcess.start(kube, registry, out_dir / f"operator-{path}.log", env, args.operator_src)
    deployment_path = f"/apis/apps/v1/namespaces/{namespace}/deployments/app"
    try:
        apply_objects(kube, [modelapp(namespace, "app", repository, azurite, blob_name)])

        def template_is(image_digest: str, version: str) -> bool:
            operator.check_alive()
            deployment = api.get(deployment_path)
            if deployment is None:
                return False
            image, model_version = template_of(deployment)
            return image.endswith("@" + image_digest) and model_version == version

        wait_for("the first rollout", partial(template_is, digest, etag), timeout=120)
        limit = 30.0 if path == "receiver" else 3 * args.poll_interval + 30

        image_series, model_series = Series(path, "image"), Series(path, "model")
        for index in range(args.changes):
            if path == "polling":
                # Each rollout ends just after a poll: without a random phase every change would
                # wait almost a full interval. Uniform phase gives the expected interval / 2.
                time.sleep(random.uniform(0, args.poll_interval))
            digest = registry.push_random_image(repo_path, "stable")
            moved = time.monotonic()
            wait_for(f"image change {index}", partial(template_is, digest, etag), timeout=limit)
            image_series.seconds.append(time.monotonic() - moved)
            time.sleep(args.gap)

            if path == "polling":
                time.sleep(random.uniform(0, args.poll_interval))
            etag = publish_model(models, blob_name, f"model v{index + 1} ".encode() + secrets.token_bytes(8))
            moved = time.monotonic()
            if path == "receiver":
                post_blob_created(receiver_port, token, blob_url, etag, azurite.account_name)
            wait_for(f"model change {index}", partial(template_is, digest, etag), timeout=limit)
            model_series.seconds.append(time.monotonic() - moved)
            time.sleep(args.gap)
            print(
                f"{path} change {index + 1}/{args.changes}: image {image_series.seconds[-1]:.3f}s "
                f"model {model_series.seconds[-1]:.3f}s",
                file=sys.stderr,
            )

        # Image and model changed back to back: one rollout per pair, i.e. the Deployment's
        # revision (deployment.kubernetes.io/revision, one per new pod template) moves by one.
        def revision() -> int:
            deployment = api.get(deployment_path) or {}
            annotations = (deployment.get("metadata") or {}).get("annotations") or {}
            return int(annotations.get("deployment.kubernetes.io/revision", "0"))

        pairs = PairResult(path, args.pairs)
        for index in range(args.pairs):
            time.sleep(max(args.gap, 2 * args.coalesce))
            before = revision()
            digest = registry.push_random_image(repo_path, "stable")
            etag = publish_model(models, blob_name, f"pair {index} ".encode() + secrets.token_bytes(8))
            if path == "receiver":
                post_blob_created(receiver_port, token, blob_url, etag, azurite.account_name)
            wait_for(f"pair {index}", partial(template_is, digest, etag), timeout=limit)
            time.sleep(1.0)  # let the controller record the revision
            pairs.rollouts.append(revision() - before)
        return [image_series, model_series], pairs
    finally:
        operator.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=50, help="image changes and model changes per mode")
    parser.add_argument("--modes", default="receiver,polling", help="comma-separated: receiver, polling")
    parser.add_argument("--poll-interval", type=float, default=10.0, help="poll interval of the polling mode (s)")
    parser.add_argument("--coalesce", type=float, default=0.2, help="MODELAPP_CHANGE_COALESCE_SECONDS")
    parser.add_argument("--gap", type=float, default=0.5, help="pause between changes (s)")
    parser.add_argument("--pairs", type=int, default=5, help="image+model pairs for the one-rollout check")
    parser.add_argument("--operator-src", type=Path, default=REPO_ROOT / "operator", help="operator source root to run")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "push_to_rollout.md")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("receiver", "polling") for m in modes):
        parser.error("--modes takes receiver and/or polling")

    receiver_port = free_port()
    token = secrets.token_urlsafe(24)
    out_dir = args.out.parent / "push_to_rollout"
    stack = start_stack(notify_port=receiver_port, notify_token=token)
    results: list[Series] = []
    pair_results: list[PairResult] = []
    try:
        assert stack.kube is not None and stack.registry is not None and stack.azurite is not None
        parts = Parts(stack.kube, stack.registry, stack.azurite, KubeApi(stack.kube.kubeconfig))
        for mode in modes:
            series, pairs = run_mode(mode, args, parts, receiver_port, token, out_dir)
            results.extend(series)
            pair_results.append(pairs)
    finally:
        stack.stop()

    command = shlex.join([".venv/bin/python", *sys.argv])
    lines = [
        "## Push to rollout",
        "",
        f"Command: `{command}`  ",
        f"Changes per kind: {args.changes}; polling interval {args.poll_interval:g} s (polling mode); "
        f"coalescing window {args.coalesce:g} s; clock from tag moved / blob uploaded to the Deployment's "
        "pod template carrying the new digest / ETag.",
        "",
        "| path | change | n | p50 s | p99 s | max s |",
        "|---|---|---|---|---|---|",
        *(series.row() for series in results),
        "",
        "| path | image+model pairs | rollouts (Deployment revisions) per pair |",
        "|---|---|---|",
        *(f"| {p.path} | {p.pairs} | {', '.join(map(str, p.rollouts)) or '-'} |" for p in pair_results),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
