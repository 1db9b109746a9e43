"""The read step's outside calls: what a ModelApp's image tag and model blob resolve to now.

Reads pull Secrets and storage Secrets through the Kubernetes client and asks the registry and
the blob service through the resolvers (the watch hub's caching ones in the operator). A failure
becomes a False condition with a retry delay, never an exception.
"""

from __future__ import annotations

from modelapp_operator.api.modelapp_types import ModelApp
from modelapp_operator.clients.blob_storage import (
    BlobCredential,
    ConnectionStringCredential,
    ModelResolutionError,
    ModelResolver,
    OperatorIdentityCredential,
    check_model,
)
from modelapp_operator.clients.kube import KubeClient
from modelapp_operator.clients.registry import (
    ImageResolutionError,
    ImageResolver,
    RegistryCredentials,
    credentials_from_dockerconfig,
)
from modelapp_operator.names import ConditionType, Reason
from modelapp_operator.plan.reconcile_plan import Resolution
from modelapp_operator.plan.release import ResolvedImage, ResolvedModel, pinned_image
from modelapp_operator.plan.status import Condition


async def resolve_image(
    app: ModelApp, kube: KubeClient, images: ImageResolver
) -> tuple[ResolvedImage | None, Resolution]:
    spec = app.spec.image
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


async def _model_credential(app: ModelApp, kube: KubeClient) -> BlobCredential:
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


async def resolve_model(
    app: ModelApp, kube: KubeClient, models: ModelResolver
) -> tuple[ResolvedModel | None, Resolution]:
    model = app.spec.model
    try:
        credential = await _model_credential(app, kube)
        properties = await models.get_properties(model.blob, credential)
        resolved = check_model(model, properties)
    except ModelResolutionError as error:
        return None, _failed(ConditionType.MODEL_RESOLVED, error.reason, error.message, error.retry_after)
    reason = Reason.PINNED if model.version is not None else Reason.RESOLVED
    message = f"{model.blob.container}/{model.blob.name} version {resolved.version} sha256 {resolved.sha256}"
    return resolved, _resolved(ConditionType.MODEL_RESOLVED, reason, message)


def _resolved(type_: str, reason: str, message: str) -> Resolution:
    return Resolution(Condition(type_, "True", reason, message))


def _failed(type_: str, reason: str, message: str, retry_after: float) -> Resolution:
    return Resolution(Condition(type_, "False", reason, message), retry_after)
