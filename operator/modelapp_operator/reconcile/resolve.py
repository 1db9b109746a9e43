"""The read step's outside calls: what a ModelApp's image tag and model blob resolve to now.

Reads pull Secrets and storage Secrets through the Kubernetes client and asks the registry and
the blob service through the resolvers (the watch hub's caching ones in the operator). A failure
becomes a False condition with a retry delay, never an exception. A registry or storage account the
platform admin did not allow for the ModelApp's namespace (plan/sources.py) is refused before any
request is made: RegistryNotAllowed / StorageAccountNotAllowed.
"""

from __future__ import annotations

import asyncio
import dataclasses

from modelapp_contract.blob import PinnedVersion
from modelapp_contract.signing import SignatureError, VerifiedSignature, decode_bundle, verify_signature
from modelapp_operator.api.modelapp_types import BlobLocation, KeyRef, ModelApp
from modelapp_operator.clients.blob_storage import (
    BlobCredential,
    BlobProperties,
    ConnectionStringCredential,
    ModelPinner,
    ModelResolutionError,
    ModelResolver,
    OperatorIdentityCredential,
    PinNotAllowed,
    account_url_of,
)
from modelapp_operator.clients.kube import KubeClient
from modelapp_operator.clients.registry import (
    ImageResolutionError,
    ImageResolver,
    RegistryCredentials,
    credentials_from_dockerconfig,
)
from modelapp_operator.names import ConditionType, Reason
from modelapp_operator.plan.model_check import (
    ModelRefusal,
    check_model,
    existing_pin,
    signature_bundle,
    version_to_read,
)
from modelapp_operator.plan.reconcile_plan import Resolution
from modelapp_operator.plan.release import ResolvedImage, ResolvedModel, pinned_image
from modelapp_operator.plan.sources import NOT_ALLOWED_RETRY_SECONDS, AllowedSources, registry_refusal, storage_refusal
from modelapp_operator.plan.status import Condition


async def resolve_image(
    app: ModelApp, kube: KubeClient, images: ImageResolver, sources: AllowedSources | None = None
) -> tuple[ResolvedImage | None, Resolution]:
    """sources: the registries allowed per namespace (None: any, for callers that build their own clients)."""
    spec = app.spec.image
    # Before anything else, a digest too: its pods would pull from a registry the namespace may not use.
    refusal = registry_refusal(sources, app.namespace, spec.registry_host) if sources is not None else None
    if refusal is not None:
        return None, _failed(
            ConditionType.IMAGE_RESOLVED, Reason.REGISTRY_NOT_ALLOWED, refusal, NOT_ALLOWED_RETRY_SECONDS
        )
    pinned = pinned_image(app.spec, app.status)
    if pinned is not None:
        how = "pinned digest" if spec.digest else f"tag {spec.tag} resolved before (followTag: false)"
        return pinned, _resolved(ConditionType.IMAGE_RESOLVED, Reason.PINNED, f"{pinned.reference} ({how})")
    assert spec.tag is not None  # a spec without digest has a tag (model validation)
    credentials: RegistryCredentials | None = None
    if spec.pull_secret_name is not None:
        secret = await kube.read_secret(app.namespace, spec.pull_secret_name)
        if secret is None or ".dockerconfigjson" not in secret:
            what = "does not exist" if secret is None else "has no .dockerconfigjson key"
            message = f"pull Secret {spec.pull_secret_name} {what}"
            return None, _failed(ConditionType.IMAGE_RESOLVED, Reason.PULL_SECRET_NOT_FOUND, message, 60)
        try:
            credentials = credentials_from_dockerconfig(secret[".dockerconfigjson"], spec.registry_host)
        except ValueError as error:
            message = f"pull Secret {spec.pull_secret_name}: {error}"
            return None, _failed(ConditionType.IMAGE_RESOLVED, Reason.PULL_SECRET_INVALID, message, 300)
    try:
        digest = await images.resolve(spec.repository, spec.tag, credentials)
    except ImageResolutionError as error:
        return None, _failed(ConditionType.IMAGE_RESOLVED, error.reason, error.message, error.retry_after)
    image = ResolvedImage(repository=spec.repository, digest=digest, tag=spec.tag)
    return image, _resolved(ConditionType.IMAGE_RESOLVED, Reason.RESOLVED, f"{spec.tag} is {digest}")


async def model_credential(app: ModelApp, kube: KubeClient) -> BlobCredential:
    ref = app.spec.model.credentials.secret_ref
    if ref is None:
        return OperatorIdentityCredential()
    secret = await kube.read_secret(app.namespace, ref.name)
    if secret is None:
        raise ModelResolutionError(Reason.STORAGE_SECRET_NOT_FOUND, f"Secret {ref.name} does not exist", retry_after=60)
    if ref.key not in secret:
        raise ModelResolutionError(
            Reason.STORAGE_SECRET_NOT_FOUND, f"Secret {ref.name} has no key {ref.key}", retry_after=60
        )
    try:
        return ConnectionStringCredential(secret[ref.key].decode().strip())
    except UnicodeDecodeError:
        raise ModelResolutionError(
            Reason.STORAGE_CREDENTIAL_INVALID, f"Secret {ref.name} key {ref.key} is not text", retry_after=300
        ) from None


async def _public_key(app: ModelApp, kube: KubeClient) -> bytes:
    signature = app.spec.model.signature
    assert signature is not None
    source = signature.public_key
    ref: KeyRef = source.config_map_ref or source.secret_ref  # type: ignore[assignment]
    kind = "ConfigMap" if source.config_map_ref is not None else "Secret"
    if kind == "ConfigMap":
        config_map = await kube.get("v1", "ConfigMap", app.namespace, ref.name)
        data = (config_map or {}).get("data") or {}
        value: bytes | None = str(data[ref.key]).encode() if ref.key in data else None
        found = config_map is not None
    else:
        secret = await kube.read_secret(app.namespace, ref.name)
        value = (secret or {}).get(ref.key)
        found = secret is not None
    if value is None:
        what = "does not exist" if not found else f"has no key {ref.key}"
        raise ModelResolutionError(Reason.SIGNATURE_KEY_NOT_FOUND, f"{kind} {ref.name} {what}", retry_after=60)
    return value


async def _verify(app: ModelApp, kube: KubeClient, read: BlobProperties) -> VerifiedSignature | None:
    """The version's signature checked against the spec's public key; None when there is none to check.

    model-signing verifies from files (it writes the key and the bundle to a temporary folder), so the check
    runs in a thread: the event loop goes on with every other reconcile meanwhile."""
    encoded = signature_bundle(app.spec.model, read)
    if encoded is None:
        return None
    key = await _public_key(app, kube)
    try:
        return await asyncio.to_thread(verify_signature, decode_bundle(encoded), key)
    except SignatureError as error:
        raise ModelResolutionError(
            Reason.SIGNATURE_INVALID, f"model version {read.etag}: {error}", retry_after=300
        ) from None


def check_account(
    app: ModelApp, location: BlobLocation, credential: BlobCredential, sources: AllowedSources | None
) -> None:
    """Raise ModelResolutionError StorageAccountNotAllowed unless both the account the spec names and the one
    the credential reaches (a connection string names its own) are allowed for the ModelApp's namespace."""
    if sources is None:
        return
    for account_url in dict.fromkeys((location.account_url, account_url_of(location, credential))):
        refusal = storage_refusal(sources, app.namespace, account_url, location.container)
        if refusal is not None:
            raise ModelResolutionError(
                Reason.STORAGE_ACCOUNT_NOT_ALLOWED, refusal, retry_after=NOT_ALLOWED_RETRY_SECONDS
            )


async def resolve_model(
    app: ModelApp,
    kube: KubeClient,
    models: ModelResolver,
    pins: ModelPinner | None = None,
    sources: AllowedSources | None = None,
) -> tuple[ResolvedModel | None, Resolution]:
    """What the model resolves to, pinned to an immutable version when `pins` is given.

    spec.model.version naming an earlier ETag (a rollback) resolves to the snapshot or version
    status recorded for it; the blob's current bytes are never taken for it (plan/model_check.py decides)."""
    model = app.spec.model
    unpinned: str | None = None
    try:
        credential = await model_credential(app, kube)
        check_account(app, model.blob, credential, sources)
        read = await models.get_properties(model.blob, credential)
        wanted = version_to_read(model, read, app.status, can_restore=pins is not None)
        if isinstance(wanted, ModelRefusal):
            return None, _refused(wanted)
        if wanted is not None:
            assert pins is not None  # version_to_read restores only with a pinner
            read = await pins.pinned_properties(model.blob, credential, wanted)
        checked = check_model(model, read, await _verify(app, kube, read))
        if isinstance(checked, ModelRefusal):
            return None, _refused(checked)
        pin = wanted if wanted is not None else existing_pin(model, read, app.status) or PinnedVersion()
        if not pin.pinned and pins is not None:
            try:
                pin = await pins.snapshot(model.blob, credential, read, app.metadata.uid)
            except PinNotAllowed as error:
                unpinned = error.message
        resolved = dataclasses.replace(checked, pin=pin)
    except ModelResolutionError as error:
        return None, _failed(ConditionType.MODEL_RESOLVED, error.reason, error.message, error.retry_after)
    reason = Reason.PINNED if model.version is not None else Reason.RESOLVED
    where = f" ({pin.describe()})" if pin.pinned else ""
    message = f"{model.blob.container}/{model.blob.name} version {resolved.version}{where} sha256 {resolved.sha256}"
    if unpinned is not None:
        reason = Reason.VERSION_NOT_PINNED
        message += (
            f"; the version cannot be pinned ({unpinned}): a rollback finds these bytes only while the blob "
            "is unchanged. Grant the operator Storage Blob Data Contributor to pin versions with snapshots"
        )
    return resolved, _resolved(ConditionType.MODEL_RESOLVED, reason, message)


def _refused(refusal: ModelRefusal) -> Resolution:
    return _failed(ConditionType.MODEL_RESOLVED, refusal.reason, refusal.message, refusal.retry_after)


def _resolved(type_: str, reason: str, message: str) -> Resolution:
    return Resolution(Condition(type_, "True", reason, message))


def _failed(type_: str, reason: str, message: str, retry_after: float) -> Resolution:
    return Resolution(Condition(type_, "False", reason, message), retry_after)
