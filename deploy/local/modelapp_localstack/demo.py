"""The main job, end to end on this machine: `modelapp-demo [--once]`.

Brings up the local stack (Kubernetes with a real node that runs containers, Azurite, a TLS
registry), builds the app and operator images from Dockerfile.app and Dockerfile.operator on a
Debian base image, installs the operator in-cluster with `kubectl apply -k deploy/`, publishes a
model and applies a ModelApp. The operator resolves the pair and rolls real pods, which pull the
image by digest, download and verify the pinned model and pass their readiness probe; predictions
come through the Service. Then a second model version is published and the operator rolls the pods
to it by itself; the new pods answer. Everything is stopped and removed on exit (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from modelapp_operator.names import (
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_RECONCILE_REQUEST,
    API_VERSION,
    KIND,
    LABEL_INSTANCE,
    ConditionType,
)

from . import images
from .binaries import REPO_ROOT
from .incluster import TENANT_NAMESPACE, InClusterOperator, install_operator
from .operator import tenant_secrets
from .procs import StackError
from .stack import Stack

NAMESPACE = TENANT_NAMESPACE
APP_NAME = "iris"
APP_REPOSITORY = "modelapp/iris-server"
OPERATOR_REPOSITORY = "modelapp/operator"
MODEL_CONTAINER = "models"
MODEL_BLOB = "iris/model.onnx"
TEST_SET_BLOB = "iris/test-set.json"
MIN_ACCURACY = 0.9
STEPS = 12
POLL_SECONDS = 5
# Iris rows: a setosa, a virginica and a versicolor near the virginica border.
SAMPLE_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5], [5.9, 3.0, 4.2, 1.5]]
# How long the operator gets to notice a new blob version by itself before the demo asks it to
# reconcile (as a Blob Storage event would).
SELF_NOTICE_SECONDS = 20.0
READY_TIMEOUT_SECONDS = 300.0


class DemoError(Exception):
    """A step failed; the message says which and what was seen."""


@dataclass
class Demo:
    run_dir: Path
    stack: Stack | None = None
    operator: InClusterOperator | None = None
    step: int = 0
    started: float = field(default_factory=time.monotonic)
    # Both model versions are trained in a thread from the start: training needs no stack, and its ~5 s of
    # scikit-learn import and fit then overlaps the stack's start and the image pushes (issue 23).
    trained: dict[int, Future[Path]] = field(default_factory=dict)

    # --- output ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.step += 1
        began = time.monotonic()
        print(f"\n[{self.step}/{STEPS}] {title}", flush=True)
        yield
        print(
            f"      done in {time.monotonic() - began:.1f}s (total {time.monotonic() - self.started:.0f}s)", flush=True
        )

    @staticmethod
    def say(text: str) -> None:
        with contextlib.suppress(OSError):
            print(f"      {text}", flush=True)

    # --- steps ----------------------------------------------------------------------------------

    def start_stack(self) -> Stack:
        with self.stage("Start the local stack: Kubernetes (a real node + a kwok node), Azurite, TLS registry"):
            self.stack = Stack.create(self.run_dir / "stack", real_nodes=1)
            kube = self.stack.start_kube(nodes=1)
            azurite = self.stack.start_azurite()
            registry = self.stack.start_registry()
            assert self.stack.network is not None
            self.say(f"Kubernetes  {kube.server}  (KUBECONFIG={kube.kubeconfig})")
            self.say(f"real node   real-node-0: containerd, kubelet, kube-proxy in netns {self.stack.network.namespace}"
                     f", pods {self.stack.network.pod_cidr}")
            self.say(f"Azurite     {azurite.blob_endpoint}")
            self.say(f"registry    {registry.url}")
        return self.stack

    def build_images(self, stack: Stack) -> tuple[str, str]:
        with self.stage("Build the images from Dockerfile.app and Dockerfile.operator (Debian base, buildah)"):
            assert stack.registry is not None
            self.say("cached by content in ~/.cache/modelapp/images; the first run on a machine builds them (minutes)")
            buildah = stack.buildah()
            app = images.build_project_image(buildah, "app", stack.registry, repository=APP_REPOSITORY, tag="demo-1")
            operator = images.build_project_image(buildah, "operator", stack.registry,
                                                  repository=OPERATOR_REPOSITORY, tag="demo")
            self.say(f"pushed {app}")
            self.say(f"pushed {operator}")
        return app, operator

    def install_operator(self, stack: Stack, operator_image: str) -> InClusterOperator:
        with self.stage("Install the operator in-cluster: kubectl apply -k deploy/ (+ a local overlay)"):
            assert stack.kube is not None and stack.registry is not None and stack.azurite is not None
            self.operator = install_operator(
                stack.kube, stack.registry, operator_image, self.run_dir,
                settings={"MODELAPP_POLL_INTERVAL_SECONDS": str(POLL_SECONDS)},
            )
            pod = self.operator.pods()[0]
            self.say(f"pod {pod['metadata']['namespace']}/{pod['metadata']['name']} on {pod['spec']['nodeName']}, "
                     f"ServiceAccount {pod['spec']['serviceAccountName']} (its own RBAC, pod security restricted)")
            items = tenant_secrets(NAMESPACE, stack.registry, stack.azurite)
            stack.kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                       "items": items}))
            self.say(f"namespace {NAMESPACE} (deploy/tenant): pull Secret regcred, storage Secret storage")
        return self.operator

    def publish(self, stack: Stack, version: int) -> tuple[str, str]:
        from modelapp_serving.publish import publish_model  # noqa: PLC0415 - the app's module, imported when used

        assert stack.azurite is not None
        trained = self.trained.get(version)
        model_file = trained.result() if trained else train_model(self.run_dir / f"model-v{version}", version)
        published = publish_model(
            model_file,
            (MODEL_CONTAINER, MODEL_BLOB),
            connection_string=stack.azurite.connection_string,
            overwrite=True,
            progress=False,
        )
        self.say(f"published {published.url}  ({published.size} bytes)")
        self.say(f"version (ETag) {published.etag}  sha256 {published.sha256[:16]}...")
        return published.etag, published.sha256

    def apply_modelapp(self, stack: Stack, app_image: str) -> None:
        with self.stage(f"Apply ModelApp {NAMESPACE}/{APP_NAME}"):
            assert stack.kube is not None and stack.azurite is not None
            repository = app_image.split("@", 1)[0]
            modelapp: dict[str, Any] = {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": APP_NAME, "namespace": NAMESPACE},
                "spec": {
                    "image": {"repository": repository, "tag": "demo-1", "pullSecretName": "regcred"},
                    "model": {
                        "blob": {
                            "accountUrl": stack.azurite.blob_endpoint,
                            "container": MODEL_CONTAINER,
                            "name": MODEL_BLOB,
                        },
                        "credentials": {"secretRef": {"name": "storage"}},
                    },
                    "replicas": 2,
                    "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
                    "rollout": {"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": 180},
                    # A new pair runs as a candidate and must answer the test set before any user sees it.
                    "release": {
                        "strategy": "Gated",
                        "testSet": {"blob": TEST_SET_BLOB, "minAccuracy": MIN_ACCURACY},
                        "timeoutSeconds": 180,
                        "drainSeconds": 3,
                    },
                },
            }
            stack.kube.kubectl("apply", "-f", "-", input=json.dumps(modelapp))
            self.say("image follows tag demo-1; model follows the blob (no version pinned)")
            self.say(f"release gate: a new pair must answer {TEST_SET_BLOB} with accuracy >= {MIN_ACCURACY} first")

    def modelapp(self) -> dict[str, Any]:
        assert self.stack is not None and self.stack.kube is not None
        result: dict[str, Any] = json.loads(
            self.stack.kube.kubectl("get", "modelapp", APP_NAME, "-n", NAMESPACE, "-o", "json").stdout)
        return result

    def wait_ready(self, model_version: str | None, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        shown = ""
        while True:
            body = self.modelapp()
            status = body.get("status") or {}
            conditions = {c["type"]: c for c in status.get("conditions") or []}
            ready = conditions.get(ConditionType.READY) or {}
            gate = status.get("gate") or {}
            line = f"Ready={ready.get('status', '?')} {ready.get('reason', '')}: {ready.get('message', '')}"
            if gate.get("phase"):
                line += f"; gate {gate['phase']}: {gate.get('message', '')}"
            if line != shown:
                self.say(line)
                shown = line
            on_version = model_version is None or (status.get("model") or {}).get("version") == model_version
            if (ready.get("status") == "True" and on_version
                    and status.get("observedGeneration") == body["metadata"]["generation"]):
                self.say(f"Ready: image {status['image']['digest'][:19]}...  model {status['model']['version']}  "
                         f"replicas {status.get('replicaSummary', '')}")
                return body
            if time.monotonic() > deadline:
                raise DemoError(f"{what}: not Ready after {READY_TIMEOUT_SECONDS:.0f}s ({line})\n{self.diagnostics()}")
            time.sleep(0.25)

    def diagnostics(self) -> str:
        if self.stack is None or self.stack.kube is None:
            return ""
        pods = self.stack.kube.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
        gate = json.dumps((self.modelapp().get("status") or {}).get("gate"))
        # The operator's own lines, without its periodic poll reports (they fill any tail of the log).
        lines = (self.operator.logs(2000) if self.operator else "").splitlines()
        logs = "\n".join([line for line in lines if "watch poll" not in line][-60:])
        return f"--- pods ---\n{pods}\n--- status.gate ---\n{gate}\n--- operator ---\n{logs}"

    def show_pods(self) -> None:
        assert self.stack is not None and self.stack.kube is not None
        pods = json.loads(self.stack.kube.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", f"{LABEL_INSTANCE}={APP_NAME}", "-o", "json").stdout)["items"]
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            container = (pod["status"].get("containerStatuses") or [{}])[0]
            version = pod["metadata"].get("annotations", {}).get(ANNOTATION_MODEL_VERSION)
            self.say(f"pod {pod['metadata']['name']} on {pod['spec']['nodeName']} ip {pod['status'].get('podIP')} "
                     f"ready={container.get('ready')} model {version}")

    def predict_through_service(self, label: str, expected_version: str) -> list[Any]:
        assert self.stack is not None and self.stack.kube is not None
        service = json.loads(self.stack.kube.kubectl("get", "service", APP_NAME, "-n", NAMESPACE, "-o",
                                                     "json").stdout)
        base = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
        self.say(f"Service {NAMESPACE}/{APP_NAME} at {base} (ClusterIP, kube-proxy on the real node)")
        version = _get_json(f"{base}/version")
        model = version.get("model") or {}
        if model.get("etag") != expected_version:
            raise DemoError(f"the Service answered with model {model} but the ModelApp is Ready on {expected_version}")
        self.say(f"GET /version: image {version.get('image')}")
        sha256 = str(model.get("sha256"))[:16]
        self.say(f"              model {model.get('etag')} sha256 {sha256}... (verified in the pod)")
        predictions = _post_json(f"{base}/predict", {"instances": SAMPLE_ROWS})["predictions"]
        self.say(f"POST /predict {json.dumps({'instances': SAMPLE_ROWS})}")
        print(f"      prediction (model {label} {expected_version}): {json.dumps(predictions)}", flush=True)
        return list(predictions)

    def publish_test_set(self, stack: Stack) -> None:
        """The labelled iris rows beside the model: what the release gate runs every candidate against."""
        from azure.storage.blob import BlobServiceClient  # noqa: PLC0415
        from sklearn.datasets import load_iris  # noqa: PLC0415

        assert stack.azurite is not None
        features, labels = load_iris(return_X_y=True)
        document = {"instances": features.round(2).tolist(), "expected": [int(label) for label in labels]}
        service = BlobServiceClient.from_connection_string(stack.azurite.connection_string)
        service.get_blob_client(MODEL_CONTAINER, TEST_SET_BLOB).upload_blob(json.dumps(document), overwrite=True)
        self.say(f"published the test set {MODEL_CONTAINER}/{TEST_SET_BLOB} ({len(labels)} labelled rows)")

    def gate(self) -> dict[str, Any]:
        return dict((self.modelapp().get("status") or {}).get("gate") or {})

    def keep_out_a_bad_model(self, stack: Stack, stable_version: str) -> None:
        with self.stage("Publish model v2 (a retrained, deliberately too simple model) over the same blob"):
            bad_version, _ = self.publish(stack, 2)
        with self.stage("The release gate tests v2 as a candidate beside v1 and keeps it out"):
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            shown = ""
            while True:
                gate = self.gate()
                line = f"gate {gate.get('phase', '-')}: {gate.get('message', '')}"
                if line != shown:
                    self.say(line)
                    shown = line
                candidate = (gate.get("candidate") or {}).get("modelVersion")
                if candidate == bad_version and gate.get("phase") in ("Rejected", "Promoting", "Promoted"):
                    break
                if time.monotonic() > deadline:
                    raise DemoError(f"the gate did not decide on v2 within {READY_TIMEOUT_SECONDS:.0f}s\n"
                                    f"{self.diagnostics()}")  # fmt: skip
                time.sleep(0.25)
            if gate.get("phase") != "Rejected":
                raise DemoError(f"the release gate let model v2 through: {gate}")
            self.say(f"model v2 kept out by the release gate: {gate.get('message')}")
            self.predict_through_service("v1", stable_version)

    def roll_to_new_model(self, stack: Stack, old_version: str) -> str:
        assert stack.kube is not None
        with self.stage("Publish model v3 (a retrained, deeper model) over the same blob"):
            new_version, _ = self.publish(stack, 3)
        with self.stage("The gate passes v3 and switches the Service to it; the operator rolls the pods to it"):
            deadline = time.monotonic() + SELF_NOTICE_SECONDS
            noticed = False
            while time.monotonic() < deadline:
                status = self.modelapp().get("status") or {}
                candidate = ((status.get("gate") or {}).get("candidate") or {}).get("modelVersion")
                if new_version in (candidate, (status.get("model") or {}).get("version")):
                    noticed = True
                    break
                time.sleep(0.5)
            if noticed:
                self.say(f"the operator noticed the new blob version by itself (poll every {POLL_SECONDS}s)")
            else:
                # What a Blob Storage event (or the receiver) does: ask for a reconcile.
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                stack.kube.kubectl("annotate", "modelapp", APP_NAME, "-n", NAMESPACE, "--overwrite",
                                   f"{ANNOTATION_RECONCILE_REQUEST}={stamp}")
                self.say(f"not noticed within {SELF_NOTICE_SECONDS:.0f}s: requested a reconcile")
            self.wait_ready(new_version, "rollout to model v2")
            self.show_pods()
            if new_version == old_version:
                raise DemoError("model v2 has the same ETag as v1")
            from modelapp_operator.cli.status import render_status  # noqa: PLC0415

            self.say(f"modelapp status {APP_NAME} -n {NAMESPACE}:")
            for line in render_status(self.modelapp(), datetime.now(UTC)).splitlines():
                self.say(f"  {line}")
        return new_version

    # --- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-train") as trainer:
            for version in (1, 2, 3):
                self.trained[version] = trainer.submit(train_model, self.run_dir / f"model-v{version}", version)
            self._run()

    def _run(self) -> None:
        stack = self.start_stack()
        app_image, operator_image = self.build_images(stack)
        self.install_operator(stack, operator_image)
        with self.stage(f"Train model v1 (iris LogisticRegression) and publish it to Azurite {MODEL_CONTAINER}/"):
            v1, _ = self.publish(stack, 1)
            self.publish_test_set(stack)
        self.apply_modelapp(stack, app_image)
        with self.stage("Wait until the ModelApp is Ready: real pods pull, download + verify the model, pass /readyz"):
            self.wait_ready(v1, "first rollout")
            self.show_pods()
        with self.stage("Predict through the Service"):
            self.predict_through_service("v1", v1)
        self.keep_out_a_bad_model(stack, v1)
        v3 = self.roll_to_new_model(stack, v1)
        with self.stage("Predict through the Service: the new pods answer"):
            self.predict_through_service("v3", v3)
        print(f"\nrolled over from model v1 to v3 in {time.monotonic() - self.started:.0f}s total (v2 kept out by "
              "the release gate)", flush=True)  # fmt: skip


def train_model(directory: Path, version: int) -> Path:
    """v1: the sample LogisticRegression; v2: a one-split decision tree (visibly different answers, 67 % of the
    iris rows right); v3: a three-level tree (97 % right)."""
    from modelapp_serving.sample_model import export_onnx, train_iris_classifier  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    if version == 1:
        classifier = train_iris_classifier()
    else:
        from sklearn.datasets import load_iris  # noqa: PLC0415
        from sklearn.tree import DecisionTreeClassifier  # noqa: PLC0415

        features, labels = load_iris(return_X_y=True)
        depth = 1 if version == 2 else 3
        classifier = DecisionTreeClassifier(max_depth=depth, random_state=version)
        classifier.fit(features.astype("float32"), labels)
    return export_onnx(classifier, directory / "iris.onnx")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _post_json(url: str, body: Any) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modelapp-demo",
        description=(
            "ModelApp end to end on this machine: a local stack with a real node, the app and operator images "
            "built from the project's Dockerfiles, the operator in-cluster, a ModelApp rolled to real pods that "
            "answer through the Service; then a new model version rolled out and served. Runs until Ctrl-C and "
            "cleans up everything."
        ),
        epilog="Needs deploy/local/setup.sh to have run once (binaries, Debian packages, Azurite). Runs as root.",
    )
    parser.add_argument("--once", action="store_true", help="exit after the roll-over to model v2 (for tests)")
    parser.add_argument(
        "--run-dir", type=Path, help="folder for everything the demo makes (default: a new .run/demo-*)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs) after stopping")
    args = parser.parse_args(argv)

    base = REPO_ROOT / ".run"
    base.mkdir(exist_ok=True)
    run_dir = args.run_dir or base / f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(run_dir=run_dir)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops it even when started in the background
    code = 0
    try:
        demo.run()
        if not args.once:
            print("\nthe operator and the app keep running in the cluster; Ctrl-C stops everything", flush=True)
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            print("\ninterrupted", flush=True)
        code = 130
    except (DemoError, StackError, subprocess.CalledProcessError, urllib.error.URLError) as error:
        detail = f"\n{error.stderr}" if isinstance(error, subprocess.CalledProcessError) else ""
        with contextlib.suppress(OSError):
            print(f"\ndemo failed at step {demo.step}/{STEPS}: {error}{detail}", file=sys.stderr, flush=True)
        code = 1
    finally:
        with contextlib.suppress(OSError):
            print("cleaning up: the stack (pods, node, network, processes)", flush=True)
        demo.stop()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                print(f"kept {run_dir}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
