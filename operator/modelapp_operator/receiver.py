"""Webhook receiver: registries and Event Grid tell the operator about pushes right away.

One aiohttp server inside the operator. Routes:
  POST /webhooks/acr        ACR webhook, one event per request
  POST /webhooks/registry   CNCF distribution notifications ({"events": [...]})
  POST /webhooks/eventgrid  Event Grid (Event Grid or CloudEvents schema), incl. the validation handshake
  OPTIONS /webhooks/eventgrid  CloudEvents abuse-protection handshake
  GET /healthz              liveness (no token: probes cannot carry one)
  GET /stats                the watch hub's counters (token required)

ACR webhooks and Event Grid cannot sign requests; they can only add a header or put a
secret in the URL. So every webhook request must carry the shared secret as
`Authorization: Bearer <token>` or `?token=<token>`. The access log is off (it would
print the query string); nothing here logs a token.

Handlers only parse and hand the changes to the hub in background tasks: answers are fast,
and a flood of events for one push costs one registry request (the hub's single-flight).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web
from modelapp_operator.config import ConfigError
from modelapp_operator.watch import parse_blob_url

_log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_PORT = 8082  # 8081 is kopf's liveness endpoint
REGISTRY_EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
    }
)
EVENTGRID_VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
EVENTGRID_BLOB_CREATED = "Microsoft.Storage.BlobCreated"
EVENTGRID_IMAGE_PUSHED = "Microsoft.ContainerRegistry.ImagePushed"


# --- change records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePushed:
    host: str | None  # registry host[:port]; None when the event does not say
    repository: str  # path inside the registry
    tag: str
    digest: str | None


@dataclass(frozen=True)
class BlobChanged:
    account: str  # account URL (normalized) or, when only that is known, the account name
    container: str
    blob: str
    etag: str | None


Change = ImagePushed | BlobChanged


@dataclass(frozen=True)
class EventGridBatch:
    changes: tuple[Change, ...]
    validation_code: str | None = None
    ignored: int = 0


class PayloadError(ValueError):
    """The body is not what the route expects; the message names the problem (never echoes secrets)."""


# --- parsing (pure) --------------------------------------------------------------------------------


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{what} is missing or not a JSON object")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(f"{what} is missing or not a non-empty string")
    return value.strip()


def _optional_text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _digest(value: Any) -> str | None:
    """A digest we can trust to compare; anything else means "unknown, re-resolve"."""
    return value if isinstance(value, str) and _DIGEST.match(value) else None


def _host(request: Any, url: Any = None) -> str | None:
    host = _optional_text(request.get("host")) if isinstance(request, dict) else None
    if host is None and isinstance(url, str):
        host = urlsplit(url).netloc or None
    return host.lower() if host else None


def _image_event(
    action: Any, target: Mapping[str, Any], request: Any, default_host: str | None, *, where: str
) -> ImagePushed | None:
    if action != "push":
        return None
    media_type = target.get("mediaType")
    if isinstance(media_type, str) and media_type and media_type not in _MANIFEST_TYPES:
        return None  # a layer or config blob: no tag moved
    tag = _optional_text(target.get("tag"))
    if tag is None:
        return None  # pushed by digest: no tag moved
    if not _TAG.match(tag):
        raise PayloadError(f"{where}.target.tag is not a valid tag")
    repository = _text(target.get("repository"), f"{where}.target.repository")
    host = _host(request, target.get("url")) or default_host
    return ImagePushed(host=host, repository=repository, tag=tag, digest=_digest(target.get("digest")))


def parse_acr_event(document: Any, *, default_host: str | None = None) -> list[ImagePushed]:
    """An ACR webhook body: one event. Only `push` of a tag matters (not delete, ping, quarantine...)."""
    event = _object(document, "the body")
    action = event.get("action")
    if not isinstance(action, str):
        raise PayloadError("action is missing or not a string")
    if action != "push":
        return []
    target = _object(event.get("target"), "target")
    pushed = _image_event(action, target, event.get("request"), default_host, where="event")
    return [pushed] if pushed else []


def parse_registry_envelope(document: Any, *, default_host: str | None = None) -> list[ImagePushed]:
    """A distribution notification envelope: {"events": [...]}; manifest pushes with a tag matter."""
    envelope = _object(document, "the body")
    events = envelope.get("events")
    if not isinstance(events, list):
        raise PayloadError("events is missing or not a list")
    changes: list[ImagePushed] = []
    for index, item in enumerate(events):
        event = _object(item, f"events[{index}]")
        if event.get("action") != "push":
            continue
        target = _object(event.get("target"), f"events[{index}].target")
        pushed = _image_event("push", target, event.get("request"), default_host, where=f"events[{index}]")
        if pushed is not None and pushed not in changes:
            changes.append(pushed)
    return changes


_SUBJECT_BLOB = re.compile(r"^/blobServices/default/containers/([^/]+)/blobs/(.+)$")
_TOPIC_ACCOUNT = re.compile(r"/storageAccounts/([^/]+)$", re.IGNORECASE)


def _blob_change(event: Mapping[str, Any], data: Mapping[str, Any], where: str) -> BlobChanged:
    etag = _optional_text(data.get("eTag"))
    url = data.get("url")
    if isinstance(url, str):
        address = parse_blob_url(url)
        if address is None:
            raise PayloadError(f"{where}.data.url is not a blob URL")
        return BlobChanged(address.account_url, address.container, address.blob, etag)
    # No URL: subject names container and blob, topic (or source) the account.
    subject = event.get("subject")
    topic = event.get("topic") or event.get("source")
    match = _SUBJECT_BLOB.match(subject) if isinstance(subject, str) else None
    account = _TOPIC_ACCOUNT.search(topic) if isinstance(topic, str) else None
    if match is None or account is None:
        raise PayloadError(f"{where} has neither data.url nor a blob subject and storage account topic")
    return BlobChanged(account.group(1).lower(), match.group(1), match.group(2), etag)


def parse_eventgrid(document: Any, *, default_host: str | None = None) -> EventGridBatch:
    """Event Grid delivery: an array of events (Event Grid schema) or CloudEvents (one object or an array).

    Returns the changes, or the validation code when the batch is the subscription handshake."""
    events = document if isinstance(document, list) else [document] if isinstance(document, dict) else None
    if events is None:
        raise PayloadError("the body is not an event array or an event object")
    changes: list[Change] = []
    ignored = 0
    for index, item in enumerate(events):
        where = f"events[{index}]"
        event = _object(item, where)
        event_type = event.get("eventType", event.get("type"))
        if not isinstance(event_type, str):
            raise PayloadError(f"{where} has no eventType (Event Grid schema) or type (CloudEvents)")
        data = event.get("data")
        if event_type == EVENTGRID_VALIDATION:
            code = _text(_object(data, f"{where}.data").get("validationCode"), f"{where}.data.validationCode")
            return EventGridBatch(changes=(), validation_code=code)
        if event_type == EVENTGRID_BLOB_CREATED:
            change: Change | None = _blob_change(event, _object(data, f"{where}.data"), where)
        elif event_type == EVENTGRID_IMAGE_PUSHED:
            body = _object(data, f"{where}.data")
            target = _object(body.get("target"), f"{where}.data.target")
            change = _image_event("push", target, body.get("request"), default_host, where=f"{where}.data")
        else:
            change = None
        if change is None:
            ignored += 1
        elif change not in changes:
            changes.append(change)
    return EventGridBatch(changes=tuple(changes), ignored=ignored)


# --- configuration ---------------------------------------------------------------------------------


class TokenSource:
    """The shared secret, from a value or a file (re-read when the mounted Secret changes)."""

    def __init__(self, value: str | None = None, file: Path | None = None) -> None:
        if (value is None) == (file is None):
            raise ValueError("give exactly one of value or file")
        self._value = value.strip() if value is not None else ""
        self._file = file
        self._mtime: float | None = None
        if file is not None:
            self._reload()
        if not self._value:
            raise ConfigError("the receiver token is empty")

    def _reload(self) -> None:
        assert self._file is not None
        try:
            mtime = self._file.stat().st_mtime
            if mtime != self._mtime:
                value = self._file.read_text().strip()
                if value:
                    self._value, self._mtime = value, mtime
        except OSError as error:
            if not self._value:
                raise ConfigError(f"MODELAPP_RECEIVER_TOKEN_FILE: cannot read {self._file}: {error.strerror}") from None

    def matches(self, candidate: str) -> bool:
        if self._file is not None:
            self._reload()
        return hmac.compare_digest(candidate.encode(), self._value.encode())

    def __repr__(self) -> str:
        return "TokenSource(<redacted>)"


@dataclass(frozen=True)
class ReceiverConfig:
    enabled: bool = False
    bind: str = "0.0.0.0"  # noqa: S104 - in the cluster the Service sends webhooks to the pod IP
    port: int = DEFAULT_PORT
    token: TokenSource | None = None
    default_registry: str | None = None  # host for events that do not name one

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReceiverConfig:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, "").strip()

        token: TokenSource | None = None
        if get("MODELAPP_RECEIVER_TOKEN") and get("MODELAPP_RECEIVER_TOKEN_FILE"):
            raise ConfigError("set only one of MODELAPP_RECEIVER_TOKEN and MODELAPP_RECEIVER_TOKEN_FILE")
        if get("MODELAPP_RECEIVER_TOKEN"):
            token = TokenSource(value=get("MODELAPP_RECEIVER_TOKEN"))
        elif get("MODELAPP_RECEIVER_TOKEN_FILE"):
            path = Path(get("MODELAPP_RECEIVER_TOKEN_FILE"))
            if not path.is_file():
                raise ConfigError(f"MODELAPP_RECEIVER_TOKEN_FILE: {str(path)!r} is not a readable file")
            token = TokenSource(file=path)

        switch = get("MODELAPP_RECEIVER_ENABLED").lower()
        if switch not in ("", "true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"MODELAPP_RECEIVER_ENABLED: {switch!r} is not true or false")
        enabled = token is not None if switch == "" else switch in ("true", "1", "yes")
        if enabled and token is None:
            raise ConfigError(
                "MODELAPP_RECEIVER_ENABLED is true but no token is set: set MODELAPP_RECEIVER_TOKEN or "
                "MODELAPP_RECEIVER_TOKEN_FILE (webhooks must send it as a Bearer token or ?token=)"
            )

        port = DEFAULT_PORT
        if get("MODELAPP_RECEIVER_PORT"):
            try:
                port = int(get("MODELAPP_RECEIVER_PORT"))
            except ValueError:
                raise ConfigError(f"MODELAPP_RECEIVER_PORT: {get('MODELAPP_RECEIVER_PORT')!r} is not a port") from None
            if not 1 <= port <= 65535:
                raise ConfigError(f"MODELAPP_RECEIVER_PORT: {port} is out of range [1, 65535]")
        bind = get("MODELAPP_RECEIVER_BIND") or "0.0.0.0"  # noqa: S104
        default_registry = get("MODELAPP_RECEIVER_DEFAULT_REGISTRY").lower() or None
        return cls(enabled=enabled, bind=bind, port=port, token=token, default_registry=default_registry)


# --- the server --------------------------------------------------------------------------------------


class ChangeSink(Protocol):
    """What the receiver hands changes to (the WatchHub)."""

    async def notify_image_pushed(self, host: str | None, repository: str, tag: str, digest: str | None) -> int: ...

    async def notify_blob_changed(self, account: str, container: str, blob: str, etag: str | None) -> int: ...


def _error(status: int, error: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status, headers=headers)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure is a short JSON answer; none carries a stack trace."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return _error(error.status, error.reason.lower().replace(" ", "_"), error.reason, headers)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        _log.error("receiver: %s %s failed: %s", request.method, request.path, type(error).__name__)
        return _error(500, "internal_error", "the receiver failed to handle this request")


class Receiver:
    """The webhook server. `await start()`, `await stop()`; `port` is the bound port (for port 0)."""

    def __init__(
        self,
        sink: ChangeSink,
        token: TokenSource | str,
        *,
        bind: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        default_registry: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        stats: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._sink = sink
        self._token = token if isinstance(token, TokenSource) else TokenSource(value=token)
        self._bind = bind
        self._port = port
        self._default_registry = default_registry
        self._max_body = max_body_bytes
        self._stats = stats
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[int]] = set()
        self.received = 0  # accepted changes, for tests and the stats endpoint

    @classmethod
    def from_config(
        cls, sink: ChangeSink, config: ReceiverConfig, *, stats: Callable[[], Mapping[str, Any]] | None = None
    ) -> Receiver:
        if config.token is None:
            raise ConfigError("the receiver needs MODELAPP_RECEIVER_TOKEN or MODELAPP_RECEIVER_TOKEN_FILE")
        return cls(
            sink,
            config.token,
            bind=config.bind,
            port=config.port,
            default_registry=config.default_registry,
            stats=stats,
        )

    @property
    def port(self) -> int:
        return self._port

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors], client_max_size=self._max_body)
        app.router.add_post("/webhooks/acr", self._acr)
        app.router.add_post("/webhooks/registry", self._registry)
        app.router.add_post("/webhooks/eventgrid", self._eventgrid)
        app.router.add_route("OPTIONS", "/webhooks/eventgrid", self._eventgrid_options)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/stats", self._stats_handler)
        return app

    async def start(self) -> None:
        # access_log=None: the default access log prints the query string, which may hold the token.
        runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._bind, self._port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        _log.info("webhook receiver listening on %s:%d", self._bind, self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Wait for the changes handed off so far (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # helpers ---------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return self._token.matches(credentials.strip())
        query = request.query.get("token")
        return bool(query) and self._token.matches(query or "")

    def _unauthorized(self) -> web.Response:
        return _error(
            401,
            "unauthorized",
            "missing or wrong token: send Authorization: Bearer <token> or add ?token=<token> to the URL",
            {"WWW-Authenticate": 'Bearer realm="modelapp-receiver"'},
        )

    async def _json_body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > self._max_body:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(64 * 1024)
            if not chunk:
                break
            size += len(chunk)
            if size > self._max_body:
                raise _TooLarge
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise PayloadError("the body is empty: expected JSON")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise PayloadError("the body is not UTF-8 text") from None
        except json.JSONDecodeError as error:
            raise PayloadError(
                f"the body is not JSON ({error.msg} at line {error.lineno} column {error.colno})"
            ) from None

    async def _handle(
        self, request: web.Request, parse: Callable[[Any], tuple[list[Change], web.Response | None]], status: int
    ) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            document = await self._json_body(request)
            changes, early = parse(document)
        except _TooLarge:
            return _error(413, "payload_too_large", f"the body is larger than {self._max_body} bytes")
        except PayloadError as error:
            return _error(400, "bad_request", str(error))
        if early is not None:
            return early
        for change in changes:
            self._hand_off(change)
        _log.debug("receiver: %s: %d change(s)", request.path, len(changes))
        return web.json_response({"accepted": len(changes)}, status=status)

    def _hand_off(self, change: Change) -> None:
        self.received += 1
        if isinstance(change, ImagePushed):
            work = self._sink.notify_image_pushed(change.host, change.repository, change.tag, change.digest)
        else:
            work = self._sink.notify_blob_changed(change.account, change.container, change.blob, change.etag)
        task = asyncio.create_task(work, name="modelapp-receiver-change")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[int]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            _log.warning("receiver: handling a change failed: %s", type(error).__name__)

    # routes ----------------------------------------------------------------------------------

    async def _acr(self, request: web.Request) -> web.Response:
        def parse(document: Any) -> tuple[list[Change], web.Response | None]:
            return list(parse_acr_event(document, default_host=self._default_registry)), None

        return await self._handle(request, parse, 202)

    async def _registry(self, request: web.Request) -> web.Response:
        def parse(document: Any) -> tuple[list[Change], web.Response | None]:
            return list(parse_registry_envelope(document, default_host=self._default_registry)), None

        return await self._handle(request, parse, 202)

    async def _eventgrid(self, request: web.Request) -> web.Response:
        def parse(document: Any) -> tuple[list[Change], web.Response | None]:
            batch = parse_eventgrid(document, default_host=self._default_registry)
            if batch.validation_code is not None:
                _log.info("receiver: answered an Event Grid subscription validation")
                return [], web.json_response({"validationResponse": batch.validation_code})
            return list(batch.changes), None

        return await self._handle(request, parse, 200)

    async def _eventgrid_options(self, request: web.Request) -> web.Response:
        """CloudEvents webhook validation: echo the origin back as allowed."""
        if not self._authorized(request):
            return self._unauthorized()
        origin = request.headers.get("WebHook-Request-Origin", "").strip()
        if not origin:
            return _error(400, "bad_request", "OPTIONS needs a WebHook-Request-Origin header")
        return web.Response(
            status=200, headers={"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "*", "Allow": "POST"}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _stats_handler(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        body: dict[str, Any] = {"received": self.received}
        if self._stats is not None:
            body["watch"] = dict(self._stats())
        return web.json_response(body)


class _TooLarge(Exception):
    pass
