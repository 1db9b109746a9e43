"""The main job, end to end on this machine: `python -m modelapp_localstack.demo [--once]`.

Brings up the local stack (Kubernetes with kwok nodes, Azurite, a TLS registry), builds and pushes
an app image, publishes a model, runs the operator against a ModelApp until it is Ready, then runs
the app locally with exactly the env the operator rendered into the Deployment's pod template and
serves a prediction. Then it publishes a second model version, shows the operator rolling the
Deployment to it, and serves a prediction from the new model. Everything it started is stopped and
its run folder removed on exit (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import base64
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from .binaries import REPO_ROOT
from .operator import OperatorProcess, apply_crd, create_tenant_namespace
from .procs import StackError, free_port
from .stack import Stack

NAMESPACE = "demo"
APP_NAME = "iris"
IMAGE_PATH = "modelapp/iris-server"
MODEL_CONTAINER = "models"
MODEL_BLOB = "iris/model.onnx"
STEPS = 10
# Iris rows: a setosa, a virginica and a versicolor near the virginica border.
SAMPLE_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5], [5.9, 3.0, 4.2, 1.5]]
# How long the operator gets to notice a new blob version by itself before the demo asks it to
# reconcile (as a Blob Storage event would).
SELF_NOTICE_SECONDS = 15.0
IMAGE_DOCKERFILE = """\
# Built by modelapp_localstack.demo. No base image can be pulled on this machine, so this image
# is FROM scratch and only carries the app's source tree; the real image is Dockerfile.app (ACR).
FROM scratch
LABEL org.opencontainers.image.title="modelapp iris-server (local demo)"
COPY app/ /app/
"""


class DemoError(Exception):
    """A step failed; the message says which and what was seen."""


@dataclass
class Demo:
    run_dir: Path
    once: bool
    stack: Stack | None = None
    operator: OperatorProcess | None = None
    app: subprocess.Popen[bytes] | None = None
    step: int = 0
    started: float = field(default_factory=time.monotonic)

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
        print(f"      {text}", flush=True)

    # --- steps ----------------------------------------------------------------------------------

    def start_stack(self) -> Stack:
        with self.stage("Start the local stack: Kubernetes (kwok nodes), Azurite, TLS registry"):
            self.stack = Stack.create(self.run_dir / "stack")
            kube = self.stack.start_kube()
            azurite = self.stack.start_azurite()
            registry = self.stack.start_registry()
            self.say(f"Kubernetes  {kube.server}  (KUBECONFIG={kube.kubeconfig})")
            self.say(f"Azurite     {azurite.blob_endpoint}")
            self.say(f"registry    {registry.url}")
        return self.stack

    def build_image(self, stack: Stack) -> tuple[str, str]:
        with self.stage("Build the app image with buildah and push it to the local registry"):
            assert stack.registry is not None
            context = self.run_dir / "image"
            shutil.copytree(REPO_ROOT / "app", context / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            (context / "Dockerfile").write_text(IMAGE_DOCKERFILE)
            self.say("no base image can be pulled here: this image is FROM scratch and carries the app's source")
            self.say("tree only (the cluster's pods are kwok's; the app itself runs locally in step 7)")
            repository = f"{stack.registry.host}/{IMAGE_PATH}"
            image = f"{repository}:demo-1"
            buildah = stack.buildah()
            buildah.build(context, image, context / "Dockerfile")
            digest = buildah.push(image, stack.registry)
            self.say(f"pushed {image}")
            self.say(f"digest {digest}")
        return repository, digest

    def publish(self, stack: Stack, version: int) -> tuple[str, str]:
        from modelapp_serving.publish import publish_model  # noqa: PLC0415 - the app's module, imported when used

        assert stack.azurite is not None
        model_file = train_model(self.run_dir / f"model-v{version}", version)
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

    def apply_modelapp(self, stack: Stack, repository: str) -> None:
        with self.stage(f"Apply the CRD and ModelApp {NAMESPACE}/{APP_NAME} (pull Secret, storage Secret)"):
            assert stack.kube is not None and stack.registry is not None and stack.azurite is not None
            kube = stack.kube
            apply_crd(kube)
            labels = {"pod-security.kubernetes.io/enforce": "restricted"}
            create_tenant_namespace(kube, NAMESPACE, stack.registry, stack.azurite, labels)
            modelapp: dict[str, Any] = {
                "apiVersion": "modelapp.io/v1alpha1",
                "kind": "ModelApp",
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
                    "rollout": {"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": 120},
                },
            }
            kube.kubectl("apply", "-f", "-", input=json.dumps(modelapp))
            self.say("image follows tag demo-1; model follows the blob (no version pinned)")

    def start_operator(self, stack: Stack) -> None:
        with self.stage("Start the operator (python -m modelapp_operator)"):
            assert stack.kube is not None and stack.registry is not None
            self.operator = OperatorProcess.start(
                stack.kube,
                stack.registry,
                self.run_dir / "operator.log",
                {"MODELAPP_POLL_INTERVAL_SECONDS": "5"},
                namespaces=[NAMESPACE],
                extra_source_roots=[REPO_ROOT / "app", REPO_ROOT / "deploy" / "local"],
            )
            self.say(f"pid {self.operator.pid}, log {self.operator.log_file}")

    def wait_ready(self, stack: Stack, model_version: str | None, what: str) -> dict[str, Any]:
        from modelapp_operator.cli.commands import EXIT_OK, Progress, wait_for  # noqa: PLC0415
        from modelapp_operator.cli.kube import KubeClient, load_connection  # noqa: PLC0415

        assert stack.kube is not None
        client = KubeClient(load_connection(str(stack.kube.kubeconfig)))

        def fetch() -> dict[str, Any]:
            if self.operator is not None and self.operator.exited():
                raise DemoError(f"the operator exited ({self.operator.returncode}):\n{self.operator_log_tail()}")
            return client.get_modelapp(NAMESPACE, APP_NAME)

        progress = Progress(sys.stderr)
        try:
            code, verdict = wait_for(fetch, None, model_version, 180, interval=0.5, progress=progress)
        finally:
            progress.done()
        if code != EXIT_OK:
            raise DemoError(f"{what}: {verdict.state} {verdict.reason}: {verdict.message}\n{self.operator_log_tail()}")
        body = client.get_modelapp(NAMESPACE, APP_NAME)
        status = body["status"]
        self.say(
            f"Ready: image {status['image']['shortDigest']}  model {status['model']['version']}  "
            f"replicas {status['replicaSummary']} (kwok pods)"
        )
        return body

    def rendered_env(self, stack: Stack) -> tuple[dict[str, str], dict[str, str]]:
        """The app container's env from the Deployment's pod template, Secret references resolved."""
        assert stack.kube is not None
        deployment = json.loads(stack.kube.kubectl("get", "deployment", APP_NAME, "-n", NAMESPACE, "-o", "json").stdout)
        template = deployment["spec"]["template"]
        env: dict[str, str] = {}
        for item in template["spec"]["containers"][0]["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            secret = json.loads(stack.kube.kubectl("get", "secret", ref["name"], "-n", NAMESPACE, "-o", "json").stdout)
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env, dict(template["metadata"].get("annotations") or {})

    def serve_and_predict(self, stack: Stack, label: str) -> tuple[list[Any], dict[str, Any]]:
        env, annotations = self.rendered_env(stack)
        shown = {k: ("***" if k == "MODELAPP_MODEL_CONNECTION_STRING" else v) for k, v in env.items()}
        self.say("pod template env, as the operator rendered it:")
        for key, value in shown.items():
            self.say(f"  {key}={value}")
        self.stop_app()
        port = free_port()
        cache = self.run_dir / "model-cache"
        cache.mkdir(exist_ok=True)
        local = {
            **os.environ,
            **env,
            # Only what a pod gets from its volumes and the node differs locally:
            "MODELAPP_MODEL_CACHE_DIR": str(cache),  # the pod's emptyDir
            "MODELAPP_PORT": str(port),  # a free loopback port instead of 8080
            "MODELAPP_WORKERS": "1",  # one worker is plenty for a demo on a shared machine
            "PYTHONPATH": _source_path(),
        }
        log_path = self.run_dir / f"app-{label}.log"
        with log_path.open("wb") as log:
            self.app = subprocess.Popen(
                [sys.executable, "-m", "modelapp_serving", "--", "--bind", f"127.0.0.1:{port}"],
                env=local,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _ready(base):
            if self.app.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise DemoError(f"the app did not become ready (log {log_path}):\n{tail}")
            time.sleep(0.2)
        version = _get_json(f"{base}/version")
        model = version.get("model") or {}
        if model.get("etag") != env["MODELAPP_MODEL_ETAG"]:
            raise DemoError(f"the app loaded {model} but the pod template pins {env['MODELAPP_MODEL_ETAG']}")
        self.say(f"app on {base} (gunicorn, log {log_path}) loaded model {env['MODELAPP_MODEL_ETAG']}, sha256 verified")
        self.say(f"pod template annotation modelapp.io/model-version={annotations.get('modelapp.io/model-version')}")
        predictions = _post_json(f"{base}/predict", {"instances": SAMPLE_ROWS})["predictions"]
        self.say(f"POST /predict {json.dumps({'instances': SAMPLE_ROWS})}")
        print(f"      prediction (model {label} {env['MODELAPP_MODEL_ETAG']}): {json.dumps(predictions)}", flush=True)
        return predictions, version

    def roll_to_new_model(self, stack: Stack, old_version: str) -> str:
        from modelapp_operator.cli.kube import KubeClient, load_connection  # noqa: PLC0415
        from modelapp_operator.names import ANNOTATION_RECONCILE_REQUEST  # noqa: PLC0415

        assert stack.kube is not None
        with self.stage("Publish model v2 (a retrained, deliberately simpler model) over the same blob"):
            new_version, _ = self.publish(stack, 2)
        with self.stage("Roll the Deployment to model v2"):
            client = KubeClient(load_connection(str(stack.kube.kubeconfig)))
            deadline = time.monotonic() + SELF_NOTICE_SECONDS
            noticed = False
            while time.monotonic() < deadline:
                status = client.get_modelapp(NAMESPACE, APP_NAME).get("status") or {}
                if (status.get("model") or {}).get("version") == new_version:
                    noticed = True
                    break
                time.sleep(0.5)
            if noticed:
                self.say("the operator noticed the new blob version by itself (poller)")
            else:
                # What a Blob Storage event (or the receiver) does: ask for a reconcile.
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                client.patch_modelapp(
                    NAMESPACE, APP_NAME, {"metadata": {"annotations": {ANNOTATION_RECONCILE_REQUEST: stamp}}}
                )
                self.say(f"not noticed within {SELF_NOTICE_SECONDS:.0f}s: requested a reconcile")
                self.say(f"(annotation {ANNOTATION_RECONCILE_REQUEST}, as a Blob Storage event would)")
            self.wait_ready(stack, new_version, "rollout to model v2")
            replica_sets = json.loads(
                stack.kube.kubectl(
                    "get", "replicasets", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={APP_NAME}", "-o", "json"
                ).stdout
            )["items"]
            for rs in sorted(replica_sets, key=lambda r: r["metadata"]["creationTimestamp"]):
                version = rs["spec"]["template"]["metadata"]["annotations"].get("modelapp.io/model-version")
                self.say(
                    f"ReplicaSet {rs['metadata']['name']}: {rs['status'].get('replicas', 0)} pods, model {version}"
                )
            if new_version == old_version:
                raise DemoError("model v2 has the same ETag as v1")
            from modelapp_operator.cli.status import render_status  # noqa: PLC0415

            self.say(f"modelapp status {APP_NAME} -n {NAMESPACE}:")
            for line in render_status(client.get_modelapp(NAMESPACE, APP_NAME), datetime.now(UTC)).splitlines():
                self.say(f"  {line}")
        return new_version

    # --- lifecycle ------------------------------------------------------------------------------

    def operator_log_tail(self, lines: int = 30) -> str:
        if self.operator is None:
            return ""
        return "--- operator log ---\n" + self.operator.log_tail(lines)

    def stop_app(self) -> None:
        _stop(self.app)
        self.app = None

    def stop(self) -> None:
        self.stop_app()
        if self.operator is not None:
            self.operator.stop()
        self.operator = None
        if self.stack is not None:
            self.stack.stop()
            self.stack = None

    def run(self) -> None:
        stack = self.start_stack()
        repository, _ = self.build_image(stack)
        with self.stage(f"Train model v1 (iris LogisticRegression) and publish it to Azurite {MODEL_CONTAINER}/"):
            v1, _ = self.publish(stack, 1)
        self.apply_modelapp(stack, repository)
        self.start_operator(stack)
        with self.stage("Wait until the ModelApp is Ready (operator: resolve tag and blob, render, roll)"):
            self.wait_ready(stack, v1, "first rollout")
        with self.stage("Run the app locally with the pod template's env and predict"):
            self.serve_and_predict(stack, "v1")
        self.roll_to_new_model(stack, v1)
        with self.stage("Run the app with the new pod template's env and predict"):
            self.serve_and_predict(stack, "v2")
        print(f"\nrolled over from model v1 to v2 in {time.monotonic() - self.started:.0f}s total", flush=True)


def train_model(directory: Path, version: int) -> Path:
    """v1: the sample LogisticRegression; v2: a one-split decision tree (visibly different answers)."""
    from modelapp_serving.sample_model import export_onnx, train_iris_classifier  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    if version == 1:
        classifier = train_iris_classifier()
    else:
        from sklearn.datasets import load_iris  # noqa: PLC0415
        from sklearn.tree import DecisionTreeClassifier  # noqa: PLC0415

        features, labels = load_iris(return_X_y=True)
        classifier = DecisionTreeClassifier(max_depth=1, random_state=version).fit(features.astype("float32"), labels)
    return export_onnx(classifier, directory / "iris.onnx")


def _source_path() -> str:
    roots = [REPO_ROOT / "operator", REPO_ROOT / "app", REPO_ROOT / "deploy" / "local"]
    return os.pathsep.join([*map(str, roots), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


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


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelapp_localstack.demo",
        description=(
            "ModelApp end to end on this machine: local stack, app image build and push, model publish, "
            "the operator rolling a ModelApp, the app serving a prediction with the operator's env; then "
            "a new model version rolled out and served. Runs until Ctrl-C and cleans up everything."
        ),
        epilog="Needs deploy/local/setup.sh to have run once (control-plane binaries, buildah, registry, Azurite).",
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
    demo = Demo(run_dir=run_dir, once=args.once)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    code = 0
    try:
        demo.run()
        if not args.once:
            print("\nthe operator and the app keep running; Ctrl-C stops everything", flush=True)
            while True:
                if demo.operator is not None and demo.operator.exited():
                    raise DemoError(f"the operator exited ({demo.operator.returncode})\n{demo.operator_log_tail()}")
                time.sleep(1)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        code = 130
    except (DemoError, StackError, subprocess.CalledProcessError) as error:
        detail = f"\n{error.stderr}" if isinstance(error, subprocess.CalledProcessError) else ""
        print(f"\ndemo failed at step {demo.step}/{STEPS}: {error}{detail}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("cleaning up: app, operator, stack", flush=True)
        demo.stop()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"kept {run_dir}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
