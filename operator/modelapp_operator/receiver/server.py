"""Webhook receiver: registries and Event Grid tell the operator about pushes right away.

One aiohttp server inside the operator. Routes:
  POST /webhooks/acr        ACR webhook, one event per request
  POST /webhooks/registry   CNCF distribution notifications ({"events": [...]})
  POST /webhooks/eventgrid  Event Grid (Event Grid or CloudEvents schema), incl. the validation handshake
  OPTIONS /webhooks/eventgrid  CloudEvents abuse-protection handshake
  GET /healthz              liveness (no token: probes cannot carry one)
  GET /stats                the watch hub's counters (token required)

ACR webhooks and Event Grid cannot sign requests; both can add a header (ACR's `--headers`, Event
Grid's delivery properties). So every webhook request must carry a shared secret as
`Authorization: Bearer <token>`; a token in the URL (`?token=`) is refused with 400 and never
forwarded: URLs end up in proxies' and ingresses' access logs. Several tokens may be accepted at
once (a rotation: config.TokenSource). Event Grid's validation handshakes are answered without a
token (they carry no change and only echo what they sent). Nothing here logs a token.

Two replicas: a webhook that reaches the standby is forwarded to the leader's pod (leader.py finds
its IP from the API, in the operator's namespace), with the token in the header.

Handlers only parse and hand the changes to the hub in background tasks: answers are fast,
and a flood of events for one push costs one registry request (the hub's single-flight).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from modelapp_operator.config import DEFAULT_RECEIVER_PORT, ConfigError, ReceiverConfig, TokenSource
from modelapp_operator.metrics import METRICS
from modelapp_operator.receiver.payloads import (
    Change,
    ImagePushed,
    PayloadError,
    parse_acr_event,
    parse_eventgrid,
    parse_registry_envelope,
)

_log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
FORWARDED_HEADER = "X-ModelApp-Forwarded"
FORWARD_TIMEOUT_SECONDS = 10.0
_HOP_BY_HOP = frozenset({"host", "content-length", "connection", "transfer-encoding", "keep-alive", "upgrade"})


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


_SOURCES = {"/webhooks/acr": "acr", "/webhooks/registry": "registry", "/webhooks/eventgrid": "eventgrid"}


@web.middleware
async def _count_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """modelapp_operator_webhook_requests_total by source and status (outside _json_errors: final statuses)."""
    response = await handler(request)
    source = _SOURCES.get(request.path)
    if source == "eventgrid" and (
        request.method == "OPTIONS" or request.content_type.startswith("application/cloudevents")
    ):
        source = "cloudevents"  # the CloudEvents handshake, or CloudEvents structured mode
    if source is not None:
        METRICS.webhook_request(source, response.status)
    return response


@web.middleware
async def _refuse_token_in_url(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A token in the URL is refused (even a right one): URLs are logged by proxies and ingresses."""
    if "token" in request.query or "access_token" in request.query:
        return _error(
            400,
            "token_in_url",
            "send the token as Authorization: Bearer <token>, never in the URL (rotate a token that was sent there)",
        )
    return await handler(request)


class Receiver:
    """The webhook server. `await start()`, `await stop()`; `port` is the bound port (for port 0)."""

    def __init__(
        self,
        sink: ChangeSink,
        token: TokenSource | str,
        *,
        bind: str = "127.0.0.1",
        port: int = DEFAULT_RECEIVER_PORT,
        default_registry: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        stats: Callable[[], Mapping[str, Any]] | None = None,
        forward_to: Callable[[], str | None] | None = None,
    ) -> None:
        self._sink = sink
        # Two replicas: None while this one is active; else the active replica's host:port ("" if unknown).
        self._forward_to = forward_to
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
        cls,
        sink: ChangeSink,
        config: ReceiverConfig,
        *,
        stats: Callable[[], Mapping[str, Any]] | None = None,
        forward_to: Callable[[], str | None] | None = None,
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
            forward_to=forward_to,
        )

    @property
    def port(self) -> int:
        return self._port

    def application(self) -> web.Application:
        app = web.Application(
            middlewares=[_count_requests, _json_errors, _refuse_token_in_url, self._forward_from_standby],
            client_max_size=self._max_body,
        )
        app.router.add_post("/webhooks/acr", self._acr)
        app.router.add_post("/webhooks/registry", self._registry)
        app.router.add_post("/webhooks/eventgrid", self._eventgrid)
        app.router.add_route("OPTIONS", "/webhooks/eventgrid", self._eventgrid_options)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/stats", self._stats_handler)
        return app

    @web.middleware
    async def _forward_from_standby(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """On the standby replica, a webhook goes on to the active one, so it is never lost.

        The Service sends webhooks to either replica (both are Ready: a readiness gate on the
        standby would keep the PodDisruptionBudget from ever allowing the active one's eviction).
        With no active replica known, 503 + Retry-After: registries and Event Grid retry. The target is
        the leader's pod IP read from the API (leader.LeaderElector.forward_target), never an address a
        tenant could write; only requests with a valid token go there (the handler answers the others:
        401, or a validation handshake, which needs no leader)."""
        target = self._forward_to() if self._forward_to is not None else None
        if target is None or not request.path.startswith("/webhooks/") or request.method != "POST":
            return await handler(request)
        if not self._authorized(request):
            return await handler(request)
        if not target or request.headers.get(FORWARDED_HEADER):
            return _error(503, "standby", "this replica stands by and knows no active one: retry", {"Retry-After": "2"})
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers[FORWARDED_HEADER] = "1"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_SECONDS)) as session,
                session.post(f"http://{target}{request.path}", data=body, headers=headers) as answer,
            ):
                payload = await answer.read()
                _log.debug("receiver: forwarded %s to the active replica %s: %d", request.path, target, answer.status)
                return web.Response(status=answer.status, body=payload, content_type=answer.content_type)
        except (aiohttp.ClientError, TimeoutError) as error:
            _log.warning("receiver: forwarding to the active replica %s failed: %s", target, type(error).__name__)
            return _error(503, "standby", "the active replica did not answer: retry", {"Retry-After": "2"})

    async def start(self) -> None:
        # access_log=None: a refused `?token=` would still be in the query string the access log prints.
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
        return scheme.lower() == "bearer" and bool(credentials.strip()) and self._token.matches(credentials.strip())

    def _unauthorized(self) -> web.Response:
        return _error(
            401,
            "unauthorized",
            "missing or wrong token: send Authorization: Bearer <token>",
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
        self,
        request: web.Request,
        parse: Callable[[Any], tuple[list[Change], web.Response | None]],
        status: int,
        *,
        handshake_without_token: bool = False,
    ) -> web.Response:
        """handshake_without_token: an answer that carries no change (`early`, Event Grid's validation)
        is given without a token; everything else needs it."""
        authorized = self._authorized(request)
        if not authorized and not handshake_without_token:
            return self._unauthorized()
        try:
            document = await self._json_body(request)
            changes, early = parse(document)
        except _TooLarge:
            return _error(413, "payload_too_large", f"the body is larger than {self._max_body} bytes")
        except PayloadError as error:
            return _error(400, "bad_request", str(error)) if authorized else self._unauthorized()
        if early is not None:
            return early
        if not authorized:
            return self._unauthorized()
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

        return await self._handle(request, parse, 200, handshake_without_token=True)

    async def _eventgrid_options(self, request: web.Request) -> web.Response:
        """CloudEvents webhook validation: echo the origin back as allowed (no token: it carries no change)."""
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
