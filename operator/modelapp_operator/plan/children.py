"""The children a ModelApp owns, rendered: its Deployment and Service, and when to apply them.

Pure: no I/O. Everything the operator applies is computed here, so unit tests check the
rendered objects byte for byte. Each child carries a hash of itself (ANNOTATION_APPLIED_HASH)
so an unchanged child is not applied again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from modelapp_contract import container
from modelapp_contract.probes import LIVENESS_PATH, READINESS_PATH, default_liveness_port
from modelapp_operator.api.modelapp_types import ModelApp
from modelapp_operator.names import (
    ANNOTATION_APPLIED_HASH,
    ANNOTATION_IMAGE_DIGEST,
    ANNOTATION_MODEL_PIN,
    ANNOTATION_MODEL_SHA256,
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_PREFIX,
    ANNOTATION_SHADOW_URL,
    APP_NAME,
    CANDIDATE_SUFFIX,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_WORKLOAD_IDENTITY,
    MANAGED_BY,
)
from modelapp_operator.plan.release import Release

CONTAINER_NAME = "app"
CACHE_DIR = container.CACHE_DIR
RUN_AS_USER = container.RUN_AS_USER


PRE_STOP_SECONDS = 5


def selector_labels(app: ModelApp, *, candidate: bool = False) -> dict[str, str]:
    """The stable pods' labels, or the gate's candidate's (their instance is `<name>-candidate`)."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: candidate_name(app) if candidate else app.name}


def candidate_name(app: ModelApp) -> str:
    """The release gate's candidate Deployment and Service (plan/gate.py)."""
    return f"{app.name}{CANDIDATE_SUFFIX}"


def child_labels(app: ModelApp, *, candidate: bool = False) -> dict[str, str]:
    return {**selector_labels(app, candidate=candidate), LABEL_MANAGED_BY: MANAGED_BY}


def container_env(app: ModelApp, release: Release, shadow_url: str | None = None) -> list[dict[str, Any]]:
    """The contract env vars (modelapp_contract.container, docs/modelapp-spec.md), then the user's own.
    shadow_url: the gate's candidate Service (stable pods of a Gated release with a shadow check)."""
    spec = app.spec
    model = release.model
    env: list[dict[str, Any]] = [
        {"name": container.MODEL_URL, "value": model.url},
        {"name": container.MODEL_ETAG, "value": model.version},
        {"name": container.MODEL_SHA256, "value": model.sha256},
        {"name": container.MODEL_FORMAT, "value": model.format},
        # The immutable version to download (versionid=... or snapshot=...); absent: the ETag only.
        *([{"name": container.MODEL_PIN, "value": model.pin.query}] if model.pin.pinned else []),
        {"name": container.MODEL_CACHE_DIR, "value": CACHE_DIR},
        # A refused model (sha256, signature) stops the container with the reason as its termination message.
        {"name": container.EXIT_ON_REFUSAL, "value": "true"},
        {"name": container.PORT, "value": str(spec.port)},
        {"name": container.LIVENESS_PORT, "value": str(default_liveness_port(spec.port))},
        # The image by digest, so the app's /version and /metrics say which pair this pod serves.
        {"name": container.IMAGE, "value": release.image.reference},
        # The model's name in the Open Inference Protocol (/v2/models/<name>): the ModelApp's, as KServe
        # names it after the InferenceService.
        {"name": container.MODEL_NAME, "value": app.name},
    ]
    signature = spec.model.signature
    if signature is not None and model.verified_by == "signature":
        # The app verifies the signature in the pinned version's metadata again, with the same key.
        source = signature.public_key
        if source.config_map_ref is not None:
            key_ref = {"configMapKeyRef": {"name": source.config_map_ref.name, "key": source.config_map_ref.key}}
        else:
            assert source.secret_ref is not None
            key_ref = {"secretKeyRef": {"name": source.secret_ref.name, "key": source.secret_ref.key}}
        env.append({"name": container.MODEL_SIGNATURE_PUBLIC_KEY, "valueFrom": key_ref})
    if model.format == "pickle" and spec.model.allow_pickle:
        env.append({"name": container.ALLOW_PICKLE, "value": "true"})
    credentials = spec.model.credentials
    if credentials.secret_ref is not None:
        # The file of the Secret volume (storage_secret_volume), never the value: env is read more widely.
        env.append({"name": container.MODEL_CONNECTION_STRING_FILE, "value": container.CONNECTION_STRING_FILE})
    if credentials.client_id is not None:
        env.append({"name": "AZURE_CLIENT_ID", "value": credentials.client_id})
    shadow = spec.release.shadow
    if shadow_url is not None and shadow is not None:
        # Fixed for the ModelApp's life (the candidate Service's address): a new candidate rolls no stable pod.
        env.append({"name": container.SHADOW_URL, "value": shadow_url})
        env.append({"name": container.SHADOW_PERCENT, "value": str(shadow.percent)})
        env.append({"name": container.SHADOW_TOLERANCE, "value": repr(shadow.tolerance)})
    env.extend({"name": item.name, "value": item.value} for item in spec.env)
    return env


STORAGE_SECRET_VOLUME = "storage-credentials"  # noqa: S105 - a volume name, not a password


def storage_secret_volume(app: ModelApp) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The volume and the mount of the storage Secret's one key (none without a secretRef)."""
    ref = app.spec.model.credentials.secret_ref
    if ref is None:
        return [], []
    secret = {"secretName": ref.name, "items": [{"key": ref.key, "path": "connectionString"}], "defaultMode": 0o440}
    mount = {"name": STORAGE_SECRET_VOLUME, "mountPath": container.STORAGE_SECRET_DIR, "readOnly": True}
    return [{"name": STORAGE_SECRET_VOLUME, "secret": secret}], [mount]


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# Start-up allowance: gunicorn, imports and the model's load take ~27 s on a node with a load average
# of 10 (issue 19): 120 s leaves room for a CPU limit of a few hundred millicores. Download and
# verification are allowed 1 s per 20 MiB (the verified download measured 345 MB/s here).
STARTUP_BASE_SECONDS = 120
STARTUP_BYTES_PER_SECOND = 20 << 20
# The startup probe ticks every second (the smallest period Kubernetes allows): a pod is Ready at most
# 1 s after its model is loaded instead of up to 5 s (issue 23, bench/pod_start.py). Its threshold keeps
# the allowance above: threshold x period = startup_seconds. Once it passes, the kubelet runs the
# readiness probe at once (prober_manager.UpdatePodStatus), so readiness keeps its calmer period.
STARTUP_PROBE_PERIOD_SECONDS = 1
PROBE_PERIOD_SECONDS = 5


def startup_seconds(app: ModelApp, release: Release) -> int:
    """How long a pod may take from start to its model loaded before the kubelet restarts it."""
    if app.spec.probes.startup_seconds is not None:
        return app.spec.probes.startup_seconds
    size = release.model.size or 0
    return STARTUP_BASE_SECONDS + math.ceil(size / STARTUP_BYTES_PER_SECOND)


def probes(app: ModelApp, release: Release) -> dict[str, Any]:
    """Startup, readiness and liveness, as Kubernetes' guidance has them: the startup probe spans
    import, download, verification and load (liveness begins only after it); readiness takes a busy or
    unready pod out of the Service; liveness asks only whether the process is alive, answered by the
    gunicorn master on its own port apart from the request workers, with time-outs that fit a busy node."""
    readyz = {"httpGet": {"path": READINESS_PATH, "port": "http"}}
    return {
        "startupProbe": {
            **readyz,
            "periodSeconds": STARTUP_PROBE_PERIOD_SECONDS,
            # A probe that times out counts as one failure and takes longer than a period: the allowance
            # only grows under load, never shrinks.
            "timeoutSeconds": 2,
            "failureThreshold": math.ceil(startup_seconds(app, release) / STARTUP_PROBE_PERIOD_SECONDS),
        },
        "readinessProbe": {**readyz, "periodSeconds": PROBE_PERIOD_SECONDS, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": {"path": LIVENESS_PATH, "port": "liveness"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def pod_template(
    app: ModelApp, release: Release, *, candidate: bool = False, shadow_url: str | None = None
) -> dict[str, Any]:
    """The pod template. Only the release and the spec's pod-level fields go in: never the
    ModelApp's own labels or annotations, so editing those rolls nothing."""
    spec = app.spec
    labels = selector_labels(app, candidate=candidate)
    credentials = spec.model.credentials
    if credentials.service_account_name is not None:
        labels[LABEL_WORKLOAD_IDENTITY] = "true"
    resources: dict[str, Any] = {"requests": spec.resources.requests.as_dict()}
    if spec.resources.limits is not None and spec.resources.limits.as_dict():
        resources["limits"] = spec.resources.limits.as_dict()
    storage_volumes, storage_mounts = storage_secret_volume(app)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER_NAME,
                "image": release.image.reference,
                "imagePullPolicy": "IfNotPresent",
                "ports": [
                    {"name": "http", "containerPort": spec.port, "protocol": "TCP"},
                    {"name": "liveness", "containerPort": default_liveness_port(spec.port), "protocol": "TCP"},
                ],
                "env": container_env(app, release, shadow_url),
                "resources": resources,
                **probes(app, release),
                # A pod being replaced keeps serving until kube-proxy has stopped sending it traffic:
                # without this, gunicorn closes its socket on SIGTERM while the endpoint is still
                # programmed, and requests in that window are refused (measured: 14 of 862 under load).
                "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
                "securityContext": container_security_context(),
                # The app writes why it refused a model to /dev/termination-log before it exits; any other
                # crash leaves its last output there instead. plan/pods.py tells the two apart.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [
                    {"name": "model-cache", "mountPath": CACHE_DIR},
                    {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a mount point, not a temp file
                    *storage_mounts,
                ],
            }
        ],
        "volumes": [{"name": "model-cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}, *storage_volumes],
    }
    if credentials.service_account_name is not None:
        pod_spec["serviceAccountName"] = credentials.service_account_name
        # Workload identity projects its own token; the API token is still not needed.
    if spec.image.pull_secret_name is not None:
        pod_spec["imagePullSecrets"] = [{"name": spec.image.pull_secret_name}]
    return {
        "metadata": {
            "labels": labels,
            "annotations": {
                ANNOTATION_IMAGE_DIGEST: release.image.digest,
                ANNOTATION_MODEL_VERSION: release.model.version,
                ANNOTATION_MODEL_SHA256: release.model.sha256,
                **({ANNOTATION_MODEL_PIN: release.model.pin.query} if release.model.pin.pinned else {}),
                **({ANNOTATION_SHADOW_URL: shadow_url} if shadow_url is not None and spec.release.shadow else {}),
            },
        },
        "spec": pod_spec,
    }


def _with_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """Stamp the object with a hash of itself, so reconcile can skip applying an unchanged object."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    obj["metadata"].setdefault("annotations", {})[ANNOTATION_APPLIED_HASH] = digest[:20]
    return obj


def applied_hash(obj: Mapping[str, Any]) -> str | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_APPLIED_HASH)
    return value if isinstance(value, str) else None


def child_metadata(app: ModelApp, *, candidate: bool = False) -> dict[str, Any]:
    """Name, labels and the controller reference every child carries (the garbage collector follows it)."""
    return {
        "name": candidate_name(app) if candidate else app.name,
        "namespace": app.namespace,
        "labels": child_labels(app, candidate=candidate),
        "ownerReferences": [app.owner_reference()],
    }


def build_deployment(
    app: ModelApp, release: Release, *, candidate: bool = False, shadow_url: str | None = None, idle: bool = False
) -> dict[str, Any]:
    """The stable Deployment, or the gate's candidate (`candidate`: its own name, labels and selector;
    as many replicas, so it can take every user when the gate switches the Service to it; `idle`: none,
    no candidate is being decided)."""
    spec = app.spec
    return _with_applied_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": child_metadata(app, candidate=candidate),
            "spec": {
                "replicas": (0 if idle else max(spec.replicas, 1)) if candidate else spec.replicas,
                "revisionHistoryLimit": 10,
                "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
                "selector": {"matchLabels": selector_labels(app, candidate=candidate)},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {
                        "maxSurge": spec.rollout.max_surge,
                        "maxUnavailable": spec.rollout.max_unavailable,
                    },
                },
                "template": pod_template(app, release, candidate=candidate, shadow_url=shadow_url),
            },
        }
    )


def build_service(app: ModelApp, *, serve_candidate: bool = False) -> dict[str, Any]:
    """The user-facing Service; serve_candidate: the gate switched it to the candidate's pods (one selector
    change: kube-proxy moves every new connection at once, no rolling mix)."""
    spec = app.spec
    return _with_applied_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": child_metadata(app),
            "spec": {
                "type": spec.service.type,
                "selector": selector_labels(app, candidate=serve_candidate),
                "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    )


def needs_apply(existing: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether desired must be applied over existing: it changed since we last applied it, or the
    fields that define the running pair or the scale were edited by someone else (kubectl edit/scale)."""
    if existing is None or applied_hash(existing) != applied_hash(desired):
        return True

    def watched(obj: Mapping[str, Any]) -> tuple[Any, ...]:
        spec = obj.get("spec") or {}
        template = spec.get("template") or {}
        containers = (template.get("spec") or {}).get("containers") or [{}]
        annotations = (template.get("metadata") or {}).get("annotations") or {}
        return (
            spec.get("replicas"),
            containers[0].get("image"),
            tuple(sorted((k, v) for k, v in annotations.items() if k.startswith(ANNOTATION_PREFIX))),
            spec.get("type"),
            tuple((p.get("port"), p.get("targetPort")) for p in spec.get("ports") or []),
        )

    return watched(existing) != watched(desired)


def is_owned_by(obj: Mapping[str, Any], app: ModelApp) -> bool:
    """True when obj's controller reference is this ModelApp (by uid): only then may we change it."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("uid") == app.metadata.uid:
            return True
    return False


def template_release_changed(existing: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether applying desired over existing starts a rollout of a new image/model pair."""
    if existing is None:
        return True

    def key(obj: Mapping[str, Any]) -> tuple[Any, ...]:
        annotations = (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations") or {}
        return tuple(
            annotations.get(k)
            for k in (ANNOTATION_IMAGE_DIGEST, ANNOTATION_MODEL_VERSION, ANNOTATION_MODEL_SHA256, ANNOTATION_MODEL_PIN)
        )

    return key(existing) != key(desired)


def build_candidate_service(app: ModelApp) -> dict[str, Any]:
    """The gate's candidate Service (ClusterIP): where stable pods shadow requests and the test set runs."""
    return _with_applied_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": child_metadata(app, candidate=True),
            "spec": {
                "type": "ClusterIP",
                "selector": selector_labels(app, candidate=True),
                "ports": [{"name": "http", "port": app.spec.port, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    )


def shadow_url(candidate_service: Mapping[str, Any] | None) -> str | None:
    """The candidate Service's base URL by its ClusterIP (the local stack has no cluster DNS); None: no address yet."""
    spec = (candidate_service or {}).get("spec") or {}
    address = spec.get("clusterIP")
    ports = spec.get("ports") or [{}]
    port = ports[0].get("port")
    if not isinstance(address, str) or not address or address == "None" or not isinstance(port, int):
        return None
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


def rendered_shadow_url(deployment: Mapping[str, Any]) -> str | None:
    """The shadow address a stable Deployment was rendered with, from its template's annotation (a refresh
    does not read the candidate Service, and the watch's copy keeps no env; the address is fixed for the
    ModelApp's life, so the one rendered is the one wanted)."""
    template = (deployment.get("spec") or {}).get("template") or {}
    value = ((template.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SHADOW_URL)
    return value if isinstance(value, str) else None
