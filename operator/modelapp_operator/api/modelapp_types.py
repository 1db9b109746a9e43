"""The ModelApp custom resource as typed, validated Python objects (pydantic).

A ModelApp body is parsed once, at the start of a reconcile, into `ModelApp`;
everything downstream works on these frozen objects. The API server already
enforces the CRD schema, but the parse repeats the checks that matter so that an
object admitted under an older CRD (or created with validation off) still ends as
a clear `InvalidSpec` condition instead of a crash deeper in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from modelapp_contract.blob import blob_url, is_emulator
from modelapp_operator.api.frozen import FrozenModel
from modelapp_operator.api.release_spec import ReleaseSpec
from modelapp_operator.names import API_VERSION, KIND
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RESERVED_ENV_PREFIX = "MODELAPP_"

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_PATH_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = (
    r"^(localhost(:[0-9]{1,5})?|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+(:[0-9]{1,5})?|[A-Za-z0-9-]+:[0-9]{1,5})"
    rf"/{_PATH_COMPONENT}(/{_PATH_COMPONENT})*$"
)
_QUANTITY_CPU = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(m|k|M|G)?$"
_QUANTITY_MEMORY = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(Ki|Mi|Gi|Ti|k|M|G|T)?$"
_PERCENT = re.compile(r"^(100|[1-9]?[0-9])%$")

ModelFormat = Literal["onnx", "skops", "pickle"]  # modelapp_contract.blob.MODEL_FORMATS (contract test)
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]


class SpecError(ValueError):
    """The ModelApp cannot be acted on as written: a permanent error until the spec changes."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class ImageSpec(FrozenModel):
    repository: Annotated[str, Field(min_length=3, max_length=255, pattern=_REPOSITORY)]
    tag: Annotated[str | None, Field(max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")] = None
    digest: Annotated[str | None, Field(pattern=r"^sha256:[a-f0-9]{64}$")] = None
    follow_tag: Annotated[bool | None, Field(alias="followTag")] = None
    pull_secret_name: Annotated[str | None, Field(alias="pullSecretName", max_length=253, pattern=_DNS_SUBDOMAIN)] = (
        None
    )

    @model_validator(mode="after")
    def _tag_xor_digest(self) -> ImageSpec:
        if (self.tag is None) == (self.digest is None):
            raise ValueError("set exactly one of image.tag or image.digest")
        if self.digest is not None and self.follow_tag is not None:
            raise ValueError("image.followTag applies only to image.tag: a digest never moves")
        return self

    @property
    def registry_host(self) -> str:
        return self.repository.split("/", 1)[0]

    @property
    def path(self) -> str:
        """Repository path inside the registry (what goes after /v2/)."""
        return self.repository.split("/", 1)[1]

    @property
    def follows_tag(self) -> bool:
        return self.tag is not None and self.follow_tag is not False


class BlobLocation(FrozenModel):
    account_url: Annotated[
        str,
        Field(
            alias="accountUrl",
            min_length=10,
            max_length=2048,
            pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~-]+)?/?$",
        ),
    ]
    container: Annotated[str, Field(min_length=3, max_length=63, pattern=r"^[a-z0-9](-?[a-z0-9])+$")]
    name: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^/?#\\\s]([^?#\\]*[^/.?#\\\s])?$")]

    @field_validator("account_url")
    @classmethod
    def _port_and_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:  # above 65535
            port = 0
        if port is not None and not 1 <= port <= 65535:
            raise ValueError("model.blob.accountUrl: the port must be 1-65535")
        first_segment = parts.path.strip("/").split("/", 1)[0]
        if parts.scheme == "http" and not is_emulator((parts.hostname or "").lower(), first_segment):
            raise ValueError(
                "model.blob.accountUrl: plain http is only for the storage emulator "
                "(localhost, an IP address, or the devstoreaccount1 account): use https"
            )
        return value

    @property
    def url(self) -> str:
        """Full blob URL as the app expects it in MODELAPP_MODEL_URL (the name percent-quoted)."""
        return blob_url(self.account_url, self.container, self.name)


class SecretKeyRef(FrozenModel):
    name: Annotated[str, Field(max_length=253, pattern=_DNS_SUBDOMAIN)]
    key: Annotated[str, Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = "connectionString"


class ModelCredentials(FrozenModel):
    service_account_name: Annotated[
        str | None, Field(alias="serviceAccountName", max_length=253, pattern=_DNS_SUBDOMAIN)
    ] = None
    client_id: Annotated[
        str | None,
        Field(alias="clientId", pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"),
    ] = None
    secret_ref: Annotated[SecretKeyRef | None, Field(alias="secretRef")] = None

    @model_validator(mode="after")
    def _one_credential(self) -> ModelCredentials:
        if (self.service_account_name is None) == (self.secret_ref is None):
            raise ValueError("set exactly one of model.credentials.serviceAccountName or model.credentials.secretRef")
        if self.client_id is not None and self.service_account_name is None:
            raise ValueError("model.credentials.clientId is only used with serviceAccountName")
        return self


class KeyRef(FrozenModel):
    name: Annotated[str, Field(max_length=253, pattern=_DNS_SUBDOMAIN)]
    key: Annotated[str, Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = "publicKey"


class PublicKeySource(FrozenModel):
    config_map_ref: Annotated[KeyRef | None, Field(alias="configMapRef")] = None
    secret_ref: Annotated[KeyRef | None, Field(alias="secretRef")] = None

    @model_validator(mode="after")
    def _one_source(self) -> PublicKeySource:
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("set exactly one of model.signature.publicKey.configMapRef or secretRef")
        return self


class SignatureSpec(FrozenModel):
    """OpenSSF model signing, key mode: the model must carry a signature made with this key's private half."""

    required: bool = True
    public_key: Annotated[PublicKeySource, Field(alias="publicKey")]


class ModelSpec(FrozenModel):
    blob: BlobLocation
    version: Annotated[str | None, Field(min_length=1, max_length=256, pattern=r'^"?[!#-~]+"?$')] = None
    sha256: Annotated[str | None, Field(pattern=r"^[a-f0-9]{64}$")] = None
    format: ModelFormat | None = None
    allow_pickle: Annotated[bool, Field(alias="allowPickle")] = False
    credentials: ModelCredentials
    signature: SignatureSpec | None = None

    @property
    def requires_signature(self) -> bool:
        return self.signature is not None and self.signature.required

    @model_validator(mode="after")
    def _pickle_needs_consent(self) -> ModelSpec:
        if self.format == "pickle" and not self.allow_pickle:
            raise ValueError("model.format pickle runs arbitrary code when loaded: set model.allowPickle")
        return self


def _check_quantity(value: int | str, pattern: str) -> str:
    text = str(value)
    if not re.match(pattern, text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    return text


class ResourceList(FrozenModel):
    cpu: str | None = None
    memory: str | None = None

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: int | str | None) -> str | None:
        return None if value is None else _check_quantity(value, _QUANTITY_CPU)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: int | str | None) -> str | None:
        return None if value is None else _check_quantity(value, _QUANTITY_MEMORY)

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("cpu", self.cpu), ("memory", self.memory)) if v is not None}


class Resources(FrozenModel):
    requests: ResourceList = ResourceList(cpu="100m", memory="256Mi")
    limits: ResourceList | None = None


# The CRD's cap on spec.env, names and values together: the operator keeps every ModelApp and its Deployment.
ENV_MAX_CHARACTERS = 4096


class EnvVar(FrozenModel):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    value: Annotated[str, Field(max_length=4096)] = ""

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError("env names starting with MODELAPP_ are set by the operator")
        return name


class ServiceSpec(FrozenModel):
    type: ServiceType = "ClusterIP"
    port: Annotated[int, Field(ge=1, le=65535)] = 80


def _check_surge(value: int | str) -> int | str:
    if isinstance(value, int):
        if not 0 <= value <= 100:
            raise ValueError("must be between 0 and 100")
        return value
    if not _PERCENT.match(value):
        raise ValueError("must be a count or a percentage like 25%")
    return value


class RolloutSpec(FrozenModel):
    max_surge: Annotated[int | str, Field(alias="maxSurge")] = "25%"
    max_unavailable: Annotated[int | str, Field(alias="maxUnavailable")] = "25%"
    progress_deadline_seconds: Annotated[int, Field(alias="progressDeadlineSeconds", ge=10, le=3600)] = 600
    auto_rollback: Annotated[bool, Field(alias="autoRollback")] = True

    _check_max_surge = field_validator("max_surge", "max_unavailable")(_check_surge)

    @model_validator(mode="after")
    def _not_both_zero(self) -> RolloutSpec:
        if str(self.max_surge) in ("0", "0%") and str(self.max_unavailable) in ("0", "0%"):
            raise ValueError("rollout.maxSurge and rollout.maxUnavailable cannot both be zero")
        return self


class ProbesSpec(FrozenModel):
    # None: sized from the model (plan/children.py startup_seconds).
    startup_seconds: Annotated[int | None, Field(alias="startupSeconds", ge=10, le=86400)] = None


class AutoscalingSpec(FrozenModel):
    """spec.autoscaling: the operator renders a HorizontalPodAutoscaler (plan/autoscaling.py) that moves
    spec.replicas through the ModelApp's scale subresource between these bounds."""

    min_replicas: Annotated[int, Field(alias="minReplicas", ge=1, le=100)] = 1
    max_replicas: Annotated[int, Field(alias="maxReplicas", ge=1, le=100)]
    target_cpu_utilization_percentage: Annotated[
        int | None, Field(alias="targetCPUUtilizationPercentage", ge=1, le=1000)
    ] = None
    target_requests_per_second: Annotated[int | None, Field(alias="targetRequestsPerSecond", ge=1, le=1_000_000)] = None
    scale_down_stabilization_seconds: Annotated[
        int | None, Field(alias="scaleDownStabilizationSeconds", ge=0, le=3600)
    ] = None

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling.minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})"
            )
        return self

    @property
    def cpu_target(self) -> int | None:
        """The CPU utilisation target: as set, else 80 % when no other metric is named."""
        if self.target_cpu_utilization_percentage is None and self.target_requests_per_second is None:
            return DEFAULT_CPU_UTILIZATION_PERCENTAGE
        return self.target_cpu_utilization_percentage


DEFAULT_CPU_UTILIZATION_PERCENTAGE = 80  # the HPA's own default (kubectl autoscale) and KServe's


class ModelAppSpec(FrozenModel):
    image: ImageSpec
    model: ModelSpec
    replicas: Annotated[int, Field(ge=0, le=100)] = 1
    port: Annotated[int, Field(ge=1024, le=65535)] = 8080
    resources: Resources = Resources()
    env: Annotated[tuple[EnvVar, ...], Field(max_length=64)] = ()
    service: ServiceSpec = ServiceSpec()
    rollout: RolloutSpec = RolloutSpec()
    probes: ProbesSpec = ProbesSpec()
    autoscaling: AutoscalingSpec | None = None
    release: ReleaseSpec = ReleaseSpec()

    @field_validator("env")
    @classmethod
    def _unique_env(cls, env: tuple[EnvVar, ...]) -> tuple[EnvVar, ...]:
        names = [item.name for item in env]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate env names: {', '.join(duplicates)}")
        total = sum(len(item.name) + len(item.value) for item in env)
        if total > ENV_MAX_CHARACTERS:
            raise ValueError(f"env: {total} characters of names and values, at most {ENV_MAX_CHARACTERS}")
        return env

    @model_validator(mode="after")
    def _client_id_owns_azure_client_id(self) -> ModelAppSpec:
        if self.model.credentials.client_id is not None and any(e.name == "AZURE_CLIENT_ID" for e in self.env):
            raise ValueError("env AZURE_CLIENT_ID conflicts with model.credentials.clientId, which sets it")
        return self


class ObjectMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    namespace: str
    uid: str
    generation: int = 1
    labels: Mapping[str, str] = {}
    annotations: Mapping[str, str] = {}


class ModelApp(BaseModel):
    """A parsed ModelApp: metadata the operator needs, the typed spec, and the raw status."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    metadata: ObjectMeta
    spec: ModelAppSpec
    status: Mapping[str, Any] = {}

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    def owner_reference(self) -> dict[str, Any]:
        """Controller reference for children, so the garbage collector deletes them with the app."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.metadata.name,
            "uid": self.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.startswith("function-") or item in ("int", "str", "literal_error"):
            continue
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def parse_modelapp(body: Mapping[str, Any]) -> ModelApp:
    """Parse a ModelApp body (as kopf or the API gives it); raise SpecError naming the first bad field."""
    metadata = body.get("metadata") or {}
    name = str(metadata.get("name", ""))
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise SpecError("metadata.name", "must be a DNS-1035 label of at most 63 characters")
    try:
        return ModelApp.model_validate(
            {"metadata": metadata, "spec": body.get("spec") or {}, "status": body.get("status") or {}}
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = _field_path(tuple(first["loc"]))
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SpecError(field, message) from None
