"""The operator's vocabulary: every name the cluster sees, in one place.

API group/version/kind, labels, annotation keys, the field manager, condition types, reasons
(of conditions, history entries and events) and history outcomes. Everything else imports
these instead of spelling the strings, including the CLI and the demo.
"""

from __future__ import annotations

from typing import Final

# --- the ModelApp API ---------------------------------------------------------------------------

GROUP: Final = "modelapp.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "ModelApp"
PLURAL: Final = "modelapps"

# --- who writes --------------------------------------------------------------------------------

FIELD_MANAGER: Final = "modelapp-operator"  # server-side apply, events' reporting component
MANAGED_BY: Final = "modelapp-operator"  # value of LABEL_MANAGED_BY on every child

# --- labels ------------------------------------------------------------------------------------

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_WORKLOAD_IDENTITY: Final = "azure.workload.identity/use"
APP_NAME: Final = "modelapp"  # value of LABEL_NAME
CHILD_SELECTOR: Final = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

# --- annotations -------------------------------------------------------------------------------

ANNOTATION_PREFIX: Final = f"{GROUP}/"
# On the pod template: the pair it runs.
ANNOTATION_IMAGE_DIGEST: Final = f"{GROUP}/image-digest"
ANNOTATION_MODEL_VERSION: Final = f"{GROUP}/model-version"
ANNOTATION_MODEL_SHA256: Final = f"{GROUP}/model-sha256"
ANNOTATION_MODEL_PIN: Final = f"{GROUP}/model-pin"  # versionid=... or snapshot=... (absent: ETag only)
# On each child: a hash of what we applied, so an unchanged child is not applied again.
ANNOTATION_APPLIED_HASH: Final = f"{GROUP}/applied-hash"
# On the ModelApp, set by a person or a tool (kubectl annotate, the demo); any change of it queues a
# reconcile that resolves the tag and the blob afresh (reconcile/queue.py). The operator never writes it.
ANNOTATION_RECONCILE_REQUEST: Final = f"{GROUP}/reconcile-requested-at"
# Where kopf would keep its bookkeeping annotations (progress, finalizer). The operator has event
# handlers only and no diff base (handlers.py NoDiffBase), so kopf writes none; a prefix of its own
# keeps anything it might write apart from ours.
KOPF_PERSISTENCE_PREFIX: Final = f"operator.{GROUP}"


# --- conditions --------------------------------------------------------------------------------


class ConditionType:
    READY: Final = "Ready"
    PROGRESSING: Final = "Progressing"
    DEGRADED: Final = "Degraded"
    IMAGE_RESOLVED: Final = "ImageResolved"
    MODEL_RESOLVED: Final = "ModelResolved"
    # Whether the pinned model was verified, how (spec sha256, blob metadata, signature), or why a pod refused it.
    MODEL_VERIFIED: Final = "ModelVerified"
    ALL: Final = (READY, PROGRESSING, DEGRADED, IMAGE_RESOLVED, MODEL_RESOLVED, MODEL_VERIFIED)


class Reason:
    """Reasons of conditions, history entries and events (a resolution failure's reason is all three)."""

    # Ready / Progressing / Degraded
    PENDING: Final = "Pending"
    AVAILABLE: Final = "Available"
    ROLLING_OUT: Final = "RollingOut"
    ROLLOUT_COMPLETE: Final = "RolloutComplete"
    PROGRESS_DEADLINE_EXCEEDED: Final = "ProgressDeadlineExceeded"  # also the Deployment's own reason
    REPLICA_FAILURE: Final = "ReplicaFailure"  # also the Deployment's condition type
    AS_EXPECTED: Final = "AsExpected"
    ROLLED_BACK: Final = "RolledBack"
    # The release gate (plan/gate.py): events, and a rejected pair's failedPairs reason.
    GATE_STARTED: Final = "GateStarted"
    GATE_PASSED: Final = "GatePassed"
    GATE_REJECTED: Final = "GateRejected"
    GATE_PROMOTED: Final = "GatePromoted"
    # Ready=False reasons that stop everything until a person acts.
    INVALID_SPEC: Final = "InvalidSpec"
    NAME_CONFLICT: Final = "NameConflict"
    # ImageResolved / ModelResolved
    PINNED: Final = "Pinned"
    RESOLVED: Final = "Resolved"
    PULL_SECRET_NOT_FOUND: Final = "PullSecretNotFound"  # noqa: S105 - a reason, not a secret
    PULL_SECRET_INVALID: Final = "PullSecretInvalid"  # noqa: S105 - a reason, not a secret
    IMAGE_NOT_FOUND: Final = "ImageNotFound"
    IMAGE_RESOLUTION_FAILED: Final = "ImageResolutionFailed"
    REGISTRY_UNAVAILABLE: Final = "RegistryUnavailable"
    REGISTRY_UNAUTHORIZED: Final = "RegistryUnauthorized"
    REGISTRY_TLS_ERROR: Final = "RegistryTLSError"
    AZURE_IDENTITY_UNAVAILABLE: Final = "AzureIdentityUnavailable"
    # Tenant boundaries: hosts a platform admin did not allow get no request at all (plan/sources.py); a token
    # is asked only for the storage and ACR audiences; a body past its cap fails the resolution (config.py).
    REGISTRY_NOT_ALLOWED: Final = "RegistryNotAllowed"
    STORAGE_ACCOUNT_NOT_ALLOWED: Final = "StorageAccountNotAllowed"
    TOKEN_SCOPE_NOT_ALLOWED: Final = "TokenScopeNotAllowed"  # noqa: S105  (a reason, not a secret)
    REGISTRY_RESPONSE_TOO_LARGE: Final = "RegistryResponseTooLarge"
    STORAGE_RESPONSE_TOO_LARGE: Final = "StorageResponseTooLarge"
    STORAGE_SECRET_NOT_FOUND: Final = "StorageSecretNotFound"  # noqa: S105 - a reason, not a secret
    STORAGE_CREDENTIAL_INVALID: Final = "StorageCredentialInvalid"
    STORAGE_ACCESS_DENIED: Final = "StorageAccessDenied"
    STORAGE_UNAVAILABLE: Final = "StorageUnavailable"
    BLOB_NOT_FOUND: Final = "BlobNotFound"
    MODEL_VERSION_MISMATCH: Final = "ModelVersionMismatch"
    MODEL_METADATA_INVALID: Final = "ModelMetadataInvalid"
    MODEL_CHECKSUM_MISMATCH: Final = "ModelChecksumMismatch"
    MODEL_CHECKSUM_MISSING: Final = "ModelChecksumMissing"
    MODEL_FORMAT_UNKNOWN: Final = "ModelFormatUnknown"
    MODEL_FORMAT_MISMATCH: Final = "ModelFormatMismatch"
    PICKLE_NOT_ALLOWED: Final = "PickleNotAllowed"
    # Immutable model versions (ModelResolved) and verification (ModelVerified).
    VERSION_NOT_PINNED: Final = "VersionNotPinned"  # resolved, but no snapshot could be taken: ETag only
    MODEL_VERSION_GONE: Final = "ModelVersionGone"  # the pinned snapshot or version was deleted
    SHA256_PINNED: Final = "Sha256Pinned"  # spec.model.sha256
    SHA256_FROM_METADATA: Final = "Sha256FromMetadata"  # the blob's own metadata: whoever writes it vouches
    SIGNATURE_VERIFIED: Final = "SignatureVerified"
    SIGNATURE_MISSING: Final = "SignatureMissing"
    SIGNATURE_INVALID: Final = "SignatureInvalid"
    SIGNATURE_KEY_NOT_FOUND: Final = "SignatureKeyNotFound"
    MODEL_REFUSED: Final = "ModelRefused"  # a pod refused the model (its termination message says why)
    # What the pods of the wanted pair show (Degraded, Ready, a failed history entry): the part that failed.
    IMAGE_CRASHED: Final = "ImageCrashed"  # the container exited on its own (exit code, last lines)
    OOM_KILLED: Final = "OOMKilled"  # killed for using more memory than its limit
    PROBE_FAILED: Final = "ProbeFailed"  # restarted by the kubelet after its liveness or startup probe failed
    IMAGE_PULL_FAILED: Final = "ImagePullFailed"  # the node cannot pull the image
    POD_START_FAILED: Final = "PodStartFailed"  # the container cannot be created (e.g. a missing Secret key)
    UNSCHEDULABLE: Final = "Unschedulable"  # no node can take the pod
    NOT_VERIFIED: Final = "NotVerified"  # nothing resolved yet
    # History entries: why a revision started.
    INITIAL: Final = "Initial"
    IMAGE_CHANGED: Final = "ImageChanged"
    MODEL_CHANGED: Final = "ModelChanged"
    IMAGE_AND_MODEL_CHANGED: Final = "ImageAndModelChanged"
    SUPERSEDED_BY_REVISION: Final = "SupersededByRevision"  # + the revision number
    # Events only.
    ROLLOUT_STARTED: Final = "RolloutStarted"
    READY: Final = "Ready"


# Reasons read from the pods of the wanted pair (plan/pods.py).
POD_PROBLEM_REASONS: Final = frozenset(
    {
        Reason.MODEL_REFUSED,
        Reason.IMAGE_CRASHED,
        Reason.OOM_KILLED,
        Reason.PROBE_FAILED,
        Reason.IMAGE_PULL_FAILED,
        Reason.POD_START_FAILED,
        Reason.UNSCHEDULABLE,
    }
)

# Ready=False reasons under which the operator waits for a person instead of retrying.
BLOCKING_REASONS: Final = frozenset({Reason.INVALID_SPEC, Reason.NAME_CONFLICT})


class Outcome:
    """How a revision in status.history ended."""

    PROGRESSING: Final = "Progressing"
    READY: Final = "Ready"
    FAILED: Final = "Failed"
    SUPERSEDED: Final = "Superseded"  # replaced while still progressing: it never became Ready
    REJECTED: Final = "Rejected"  # the release gate kept it out: it ran only as a candidate (plan/gate.py)


# --- Deployment status, as the Deployment controller writes it ----------------------------------

DEPLOYMENT_PROGRESSING: Final = "Progressing"
DEPLOYMENT_REPLICA_FAILURE: Final = "ReplicaFailure"
DEPLOYMENT_DEADLINE_EXCEEDED: Final = "ProgressDeadlineExceeded"


# The release gate's candidate (plan/gate.py): its Deployment and Service are named <ModelApp>-candidate,
# and its pods carry that name as their instance label, so neither the stable Deployment's selector nor
# the user-facing Service's selects them until the gate switches the Service.
CANDIDATE_SUFFIX: Final = "-candidate"
# A person's override of the gate (`modelapp promote|abort`): "<promote|abort> <digest>/<version>".
# On a stable pod template: where its pods shadow requests (the candidate Service's address).
ANNOTATION_SHADOW_URL: Final = f"{GROUP}/shadow-url"
ANNOTATION_GATE_ACTION: Final = f"{GROUP}/gate-action"
ANNOTATION_GATE_ACTION_BY: Final = f"{GROUP}/gate-action-by"
