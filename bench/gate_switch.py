"""Push → served with the release gate, beside the plain rolling update, in one run on real pods.

One stack, one ModelApp (2 replicas, bench/push_to_served.py's set-up) whose model is checked by a test set
(150 labelled iris rows beside the model). Each change pushes a new image to the followed tag; the same
ModelApp is measured first with `spec.release.strategy: Rolling`, then `Gated` (the test set, drainSeconds 0),
alternating in rounds so both see the same machine. A poller asks the Service's /version every 20 ms and times:

  push → served   until the Service first answers from the new pair
  push → Ready    until the ModelApp is Ready on the new pair
  mixed window    from the new pair's first answer to the old pair's last: how long users got either
                  (a rolling update's overlap; with the gate, the proxy's propagation lag of one switch)

    .venv/bin/python bench/gate_switch.py [--changes 10] [--out bench/out/gate_switch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from azure.storage.blob import BlobServiceClient  # noqa: E402
from modelapp_localstack import Stack  # noqa: E402
from modelapp_localstack.incluster import TENANT_NAMESPACE  # noqa: E402
from sklearn.datasets import load_iris  # noqa: E402

from bench.push_to_served import (  # noqa: E402
    NAME,
    REPOSITORY,
    TAG,
    _json,
    _ready_on,
    _version,
    deploy_bench_app,
    percentile,
)

TEST_SET = f"{NAME}/test-set.json"
GATED = {"strategy": "Gated", "testSet": {"blob": TEST_SET, "minAccuracy": 0.9}, "drainSeconds": 0}


def publish_test_set(azurite: Any) -> dict[str, Any]:
    features, labels = load_iris(return_X_y=True)
    document = {"instances": features.round(2).tolist(), "expected": [int(label) for label in labels]}
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    client.get_blob_client("models", TEST_SET).upload_blob(json.dumps(document), overwrite=True)
    return {}


def set_strategy(stack: Stack, release: dict[str, Any]) -> None:
    assert stack.kube is not None
    patch = {"spec": {"release": {"strategy": "Rolling", "testSet": None, "drainSeconds": None, **release}}}
    stack.kube.kubectl("patch", "modelapp", NAME, "-n", TENANT_NAMESPACE, "--type=merge", "-p", json.dumps(patch))


def one_change(stack: Stack, registry: Any, base: str) -> dict[str, float]:
    old = _version(base).get("image", "").split("@")[-1]
    digest = registry.push_variant(REPOSITORY, TAG, TAG)
    pushed = time.monotonic()
    first_new = last_old = None
    ready = None
    while ready is None or time.monotonic() - ready < 3.0:  # keep watching 3 s past Ready for late old answers
        now = time.monotonic()
        if now - pushed > 400:
            raise SystemExit(f"never Ready on {digest}")
        answered = _version(base).get("image", "").split("@")[-1]
        if answered == digest and first_new is None:
            first_new = now - pushed
        if answered == old:
            last_old = now - pushed
        if ready is None and first_new is not None and _ready_on(stack, digest):
            ready = now
        time.sleep(0.02)
    assert first_new is not None and ready is not None
    return {
        "served": first_new,
        "ready": ready - pushed,
        "mixed": max(0.0, (last_old or 0.0) - first_new),
    }


def summary(values: list[dict[str, float]]) -> dict[str, Any]:
    return {
        key: {"p50": percentile([v[key] for v in values], 0.5), "p99": percentile([v[key] for v in values], 0.99),
              "all": [round(v[key], 3) for v in values]}
        for key in ("served", "ready", "mixed")
    }  # fmt: skip


def run(changes: int, out: Path) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    stack = Stack.create(real_nodes=1)
    try:
        registry, _ = deploy_bench_app(stack, replicas=2, before_apply=publish_test_set)
        service = _json(stack, "get", "service", NAME, "-n", TENANT_NAMESPACE)
        base = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
        measured: dict[str, list[dict[str, float]]] = {"Rolling": [], "Gated": []}
        for index in range(changes):
            for strategy in ("Rolling", "Gated"):
                set_strategy(stack, GATED if strategy == "Gated" else {})
                time.sleep(2)  # the operator applies the strategy (a first Gated one creates the candidate Service)
                figures = one_change(stack, registry, base)
                measured[strategy].append(figures)
                shown = ", ".join(f"{k} {v:.2f}s" for k, v in figures.items())
                print(f"round {index + 1}/{changes} {strategy}: {shown}", flush=True)
        result: dict[str, Any] = {"changes_per_strategy": changes, "replicas": 2}
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
    parser.add_argument("--changes", type=int, default=10, help="changes per strategy")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "gate_switch.json")
    args = parser.parse_args()
    result = run(args.changes, args.out)
    print(json.dumps({k: ({m: {q: x for q, x in f.items() if q != "all"} for m, f in v.items()}
                          if isinstance(v, dict) else v) for k, v in result.items()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
