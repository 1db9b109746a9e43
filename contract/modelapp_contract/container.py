"""The serving container as the operator renders it and the app expects it: the variables the operator
sets (and the app reads), where the model cache is mounted, and the user the container runs as.

The operator renders the pod template from these names (operator plan/children.py); the app reads them
(app config.py); Dockerfile.app creates the cache folder and runs as the same user. A unit test renders a
Deployment and parses its env with the app's own config.
"""

from __future__ import annotations

from typing import Final

# The model version to serve: where it is, what it must be.
MODEL_URL: Final = "MODELAPP_MODEL_URL"  # the blob URL (modelapp_contract.blob), no query string
MODEL_ETAG: Final = "MODELAPP_MODEL_ETAG"  # the resolved version (If-Match when unpinned)
MODEL_SHA256: Final = "MODELAPP_MODEL_SHA256"  # the sha256 the bytes must have
MODEL_FORMAT: Final = "MODELAPP_MODEL_FORMAT"  # onnx, skops or pickle (modelapp_contract.blob.ModelFormat)
MODEL_PIN: Final = "MODELAPP_MODEL_PIN"  # versionid=... or snapshot=... (PinnedVersion.query); absent: the ETag only
MODEL_CACHE_DIR: Final = "MODELAPP_MODEL_CACHE_DIR"
MODEL_SIGNATURE_PUBLIC_KEY: Final = "MODELAPP_MODEL_SIGNATURE_PUBLIC_KEY"  # PEM: the model's signature is checked
# The storage connection string: the operator mounts the ModelApp's Secret as a file and names the file (a value
# in the environment is read by anything that can read /proc/<pid>/environ or a crash's dump of it).
MODEL_CONNECTION_STRING_FILE: Final = "MODELAPP_MODEL_CONNECTION_STRING_FILE"
MODEL_CONNECTION_STRING: Final = "MODELAPP_MODEL_CONNECTION_STRING"  # the value itself, for runs outside a pod
ALLOW_PICKLE: Final = "MODELAPP_ALLOW_PICKLE"  # loading a pickle runs code: only with the spec's consent
# A refused model (sha256, signature, load) stops the container, its reason in the termination message.
EXIT_ON_REFUSAL: Final = "MODELAPP_EXIT_ON_REFUSAL"
# Ports: requests and readiness on PORT; liveness on LIVENESS_PORT (modelapp_contract.probes).
PORT: Final = "MODELAPP_PORT"
LIVENESS_PORT: Final = "MODELAPP_LIVENESS_PORT"
IMAGE: Final = "MODELAPP_IMAGE"  # the image by digest, shown by /version and /metrics
MODEL_NAME: Final = "MODELAPP_MODEL_NAME"  # the model's name in the Open Inference Protocol (/v2/models/<name>)
# The release gate's shadow traffic (issue 20): a stable pod sends a share of its /predict requests to the
# candidate too (modelapp_serving/shadow.py) and counts how often the answers agree; users get only its own.
# The operator sets them on a Gated release's stable pods when spec.release.shadow is set (plan/gate.py).
SHADOW_URL: Final = "MODELAPP_SHADOW_URL"  # the candidate's base URL (http://<its Service's ClusterIP>:<port>)
SHADOW_PERCENT: Final = "MODELAPP_SHADOW_PERCENT"  # share of /predict requests also sent there, 0-100
SHADOW_TOLERANCE: Final = "MODELAPP_SHADOW_TOLERANCE"  # numbers agree within this (absolute); labels exactly
# The pair a pod serves, on every /predict answer: a shadowing pod counts answers per candidate pair.
PAIR_HEADER: Final = "ModelApp-Pair"  # "<image digest>/<model version>" (version without quotes)

RENDERED: Final = (
    MODEL_URL,
    MODEL_ETAG,
    MODEL_SHA256,
    MODEL_FORMAT,
    MODEL_PIN,
    MODEL_CACHE_DIR,
    MODEL_SIGNATURE_PUBLIC_KEY,
    MODEL_CONNECTION_STRING_FILE,
    ALLOW_PICKLE,
    EXIT_ON_REFUSAL,
    PORT,
    LIVENESS_PORT,
    IMAGE,
    MODEL_NAME,
    SHADOW_URL,
    SHADOW_PERCENT,
    SHADOW_TOLERANCE,
)
"""Every variable the operator may set on a serving container (spec.env cannot set any `MODELAPP_*`)."""

DEFAULT_PORT: Final = 8080
# The model cache: an emptyDir the operator mounts here (the root filesystem is read-only); the image creates it.
CACHE_DIR: Final = "/var/cache/modelapp"
# Where the storage Secret's key is mounted (read-only, mode 0440, group RUN_AS_USER), and the file's name.
STORAGE_SECRET_DIR: Final = "/var/run/secrets/modelapp/storage"  # noqa: S105 - a folder, not a password
CONNECTION_STRING_FILE: Final = f"{STORAGE_SECRET_DIR}/connectionString"
# The numeric user and group the container runs as (Pod Security `restricted`: non-root); Dockerfile.app's USER.
RUN_AS_USER: Final = 10001
