"""The webhook receiver's HTTP behaviour: auth, errors as JSON, size limit, hand-off to the hub."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from modelapp_operator.config import DEFAULT_RECEIVER_PORT as DEFAULT_PORT
from modelapp_operator.config import ConfigError, ReceiverConfig, TokenSource
from modelapp_operator.receiver.payloads import REGISTRY_EVENTS_MEDIA_TYPE
from modelapp_operator.receiver.server import Receiver

pytestmark = pytest.mark.unit

TOKEN = "s3cret-token-for-tests"
DIGEST = "sha256:" + "ab" * 32


@dataclass
class Sink:
    images: list[tuple[str | None, str, str, str | None]] = field(default_factory=list)
    blobs: list[tuple[str, str, str, str | None]] = field(default_factory=list)
    fail: bool = False

    async def notify_image_pushed(self, host: str | None, repository: str, tag: str, digest: str | None) -> int:
        if self.fail:
            raise RuntimeError("hub exploded")
        self.images.append((host, repository, tag, digest))
        return 1

    async def notify_blob_changed(self, account: str, container: str, blob: str, etag: str | None) -> int:
        self.blobs.append((account, container, blob, etag))
        return 1


@dataclass
class Running:
    receiver: Receiver
    sink: Sink
    session: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.receiver.port}{path}"

    async def post(
        self, path: str, body: Any, *, token: str | None = TOKEN, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(self.url(path), data=data, headers=headers, **kwargs) as response:
            return response.status, await response.json(content_type=None)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    sink = Sink()
    receiver = Receiver(
        sink,
        TOKEN,
        bind="127.0.0.1",
        port=0,
        default_registry="default.example.com",
        stats=lambda: {"polls": 3},
    )
    await receiver.start()
    session = aiohttp.ClientSession()
    try:
        yield Running(receiver, sink, session)
    finally:
        await session.close()
        await receiver.stop()


def acr_event() -> dict[str, Any]:
    return {
        "id": "1",
        "timestamp": "2024-05-02T09:14:07Z",
        "action": "push",
        "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "repository": "a/b"}
        | {"tag": "v1", "size": 10, "length": 10},
        "request": {"id": "r", "host": "reg.azurecr.io", "method": "PUT"},
    }


async def test_the_token_is_taken_from_the_header_only_and_refused_in_the_url(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    assert await running.post("/webhooks/acr", acr_event()) == (202, {"accepted": 1})
    # A right token in the URL is refused too (400, not 401: the sender is told where it belongs).
    for params, token in (({"token": TOKEN}, None), ({"token": TOKEN}, TOKEN), ({"access_token": TOKEN}, None)):
        status, body = await running.post("/webhooks/acr", acr_event(), token=token, params=params)
        assert (status, body["error"]) == (400, "token_in_url")
        assert "Authorization: Bearer" in body["message"]
    async with running.session.get(running.url("/stats"), params={"token": TOKEN}) as response:
        assert response.status == 400
    await running.receiver.drain()
    assert running.sink.images == [("reg.azurecr.io", "a/b", "v1", DIGEST)]
    assert TOKEN not in caplog.text


async def test_missing_or_wrong_token_is_401_and_never_logged(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for token, params in ((None, {}), ("wrong", {}), ("", {})):
        async with running.session.post(
            running.url("/webhooks/registry"),
            json={"events": []},
            params=params,
            headers={"Authorization": f"Bearer {token}"} if token else {},
        ) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["error"] == "unauthorized"
    assert running.sink.images == []  # nothing refused reached the hub
    await running.post("/webhooks/acr", acr_event())
    await running.receiver.drain()
    assert running.sink.images == [("reg.azurecr.io", "a/b", "v1", DIGEST)]
    assert TOKEN not in caplog.text


async def test_bad_bodies_are_400_naming_the_problem(running: Running) -> None:
    status, body = await running.post("/webhooks/acr", b"{not json")
    assert status == 400 and "not JSON" in body["message"]
    status, body = await running.post("/webhooks/acr", b"")
    assert status == 400 and "empty" in body["message"]
    status, body = await running.post("/webhooks/acr", b"\xff\xfe")
    assert status == 400 and "UTF-8" in body["message"]
    status, body = await running.post("/webhooks/registry", {"events": "nope"})
    assert (status, body["message"]) == (400, "events is missing or not a list")
    status, body = await running.post("/webhooks/eventgrid", [{"data": {}}])
    assert status == 400 and "eventType" in body["message"]


async def test_oversized_body_is_413(running: Running) -> None:
    big = io.BytesIO(b"[" + b" " * (1024 * 1024) + b"]")
    async with running.session.post(
        running.url("/webhooks/eventgrid"), data=big, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(17):
            yield b" " * 65536

    async with running.session.post(
        running.url("/webhooks/acr"), data=chunks(), headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        assert response.status == 413


async def test_unknown_routes_and_methods_are_json(running: Running) -> None:
    async with running.session.get(running.url("/nope")) as response:
        assert response.status == 404 and (await response.json())["error"] == "not_found"
    async with running.session.get(running.url("/webhooks/acr")) as response:
        assert response.status == 405 and "POST" in response.headers["Allow"]
        assert (await response.json())["error"] == "method_not_allowed"


async def test_registry_envelope_and_eventgrid_routes(running: Running) -> None:
    envelope = {
        "events": [
            {
                "id": "e",
                "action": "push",
                "target": {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": DIGEST,
                    "repository": "team/app",
                    "tag": "stable",
                    "url": f"https://127.0.0.1:5000/v2/team/app/manifests/{DIGEST}",
                },
                "request": {"host": "127.0.0.1:5000"},
            }
        ]
    }
    status, body = await running.post(
        "/webhooks/registry", json.dumps(envelope).encode(), headers={"Content-Type": REGISTRY_EVENTS_MEDIA_TYPE}
    )
    assert (status, body) == (202, {"accepted": 1})
    blob = {
        "id": "b",
        "eventType": "Microsoft.Storage.BlobCreated",
        "subject": "/blobServices/default/containers/models/blobs/m.onnx",
        "data": {"url": "https://acct.blob.core.windows.net/models/m.onnx", "eTag": "0x1"},
    }
    assert await running.post("/webhooks/eventgrid", [blob]) == (200, {"accepted": 1})
    handshake = [
        {
            "id": "v",
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "data": {"validationCode": "code-123"},
        }
    ]
    assert await running.post("/webhooks/eventgrid", handshake) == (200, {"validationResponse": "code-123"})
    await running.receiver.drain()
    assert running.sink.images == [("127.0.0.1:5000", "team/app", "stable", DIGEST)]
    assert running.sink.blobs == [("https://acct.blob.core.windows.net", "models", "m.onnx", "0x1")]


async def test_acr_event_without_host_uses_configured_default(running: Running) -> None:
    event = acr_event()
    del event["request"]
    await running.post("/webhooks/acr", event)
    await running.receiver.drain()
    assert running.sink.images[0][0] == "default.example.com"


async def test_cloudevents_options_handshake(running: Running) -> None:
    headers = {"WebHook-Request-Origin": "eventgrid.azure.net", "Authorization": f"Bearer {TOKEN}"}
    async with running.session.options(running.url("/webhooks/eventgrid"), headers=headers) as response:
        assert response.status == 200
        assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    async with running.session.options(
        running.url("/webhooks/eventgrid"), headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        assert response.status == 400
    # No token: Event Grid's handshakes carry no change, and may come without delivery headers.
    async with running.session.options(
        running.url("/webhooks/eventgrid"), headers={"WebHook-Request-Origin": "x"}
    ) as response:
        assert response.status == 200 and response.headers["WebHook-Allowed-Origin"] == "x"


async def test_the_validation_event_is_answered_without_a_token_and_nothing_else_is(running: Running) -> None:
    handshake = [
        {"id": "v", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "data": {"validationCode": "c"}}
    ]
    assert await running.post("/webhooks/eventgrid", handshake, token=None) == (200, {"validationResponse": "c"})
    blob = {
        "id": "b",
        "eventType": "Microsoft.Storage.BlobCreated",
        "subject": "/blobServices/default/containers/models/blobs/m.onnx",
        "data": {"url": "https://acct.blob.core.windows.net/models/m.onnx", "eTag": "0x1"},
    }
    for body in ([blob], b"{not json", [*handshake, blob]):
        status, answer = await running.post("/webhooks/eventgrid", body, token=None)
        if status == 200:
            assert "validationResponse" in answer  # a handshake batch is answered as one: no change is taken
        else:
            assert status == 401
    await running.receiver.drain()
    assert running.sink.blobs == []


async def test_healthz_and_stats(running: Running) -> None:
    async with running.session.get(running.url("/healthz")) as response:
        assert response.status == 200 and await response.json() == {"status": "ok"}
    async with running.session.get(running.url("/stats")) as response:
        assert response.status == 401
    async with running.session.get(running.url("/stats"), headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert await response.json() == {"received": 0, "watch": {"polls": 3}}


async def test_failing_hub_does_not_fail_the_request(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    running.sink.fail = True
    assert await running.post("/webhooks/acr", acr_event()) == (202, {"accepted": 1})
    await running.receiver.drain()
    assert "handling a change failed: RuntimeError" in caplog.text


def test_receiver_config_from_env(tmp_path: Path) -> None:
    assert ReceiverConfig.from_env({}) == ReceiverConfig(enabled=False)
    config = ReceiverConfig.from_env(
        {"MODELAPP_RECEIVER_TOKEN": " abc ", "MODELAPP_RECEIVER_PORT": "9000", "MODELAPP_RECEIVER_BIND": "127.0.0.1"}
    )
    assert (config.enabled, config.port, config.bind) == (True, 9000, "127.0.0.1")
    assert config.token is not None and config.token.matches("abc") and not config.token.matches("abd")
    assert "abc" not in repr(config)
    assert (
        ReceiverConfig.from_env({"MODELAPP_RECEIVER_TOKEN": "x", "MODELAPP_RECEIVER_ENABLED": "false"}).enabled is False
    )
    assert ReceiverConfig.from_env({}).port == DEFAULT_PORT
    with pytest.raises(ConfigError, match="no token is set"):
        ReceiverConfig.from_env({"MODELAPP_RECEIVER_ENABLED": "true"})
    with pytest.raises(ConfigError, match="MODELAPP_RECEIVER_PORT"):
        ReceiverConfig.from_env({"MODELAPP_RECEIVER_TOKEN": "x", "MODELAPP_RECEIVER_PORT": "70000"})
    with pytest.raises(ConfigError, match="MODELAPP_RECEIVER_ENABLED"):
        ReceiverConfig.from_env({"MODELAPP_RECEIVER_ENABLED": "maybe"})
    with pytest.raises(ConfigError, match="only one"):
        ReceiverConfig.from_env({"MODELAPP_RECEIVER_TOKEN": "x", "MODELAPP_RECEIVER_TOKEN_FILE": "/x"})
    with pytest.raises(ConfigError, match="MODELAPP_RECEIVER_TOKEN_FILE"):
        ReceiverConfig.from_env({"MODELAPP_RECEIVER_TOKEN_FILE": str(tmp_path / "missing")})


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    source = ReceiverConfig.from_env({"MODELAPP_RECEIVER_TOKEN_FILE": str(path)}).token
    assert source is not None and source.matches("first")
    path.write_text("second\n")
    os.utime(path, (1, 1))  # a distinct mtime even on coarse clocks
    assert source.matches("second") and not source.matches("first")
    empty = tmp_path / "empty"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(ConfigError, match="empty"):
        TokenSource(file=empty)


def test_a_rotation_accepts_the_new_and_the_old_token_until_the_old_line_goes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old-token\n")
    source = TokenSource(file=path)
    path.write_text("# rotating: new first, old until every sender has the new one\nnew-token\n  old-token  \n\n")
    os.utime(path, (2, 2))
    assert source.matches("new-token") and source.matches("old-token") and source.count == 2
    assert not source.matches("") and not source.matches("# rotating") and not source.matches("new-token old-token")
    path.write_text("new-token\n")
    os.utime(path, (3, 3))
    assert source.matches("new-token") and not source.matches("old-token")


async def test_either_token_of_a_rotation_passes_the_receiver(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("new-token\nold-token\n")
    receiver = Receiver(Sink(), TokenSource(file=path), bind="127.0.0.1", port=0)
    await receiver.start()
    try:
        async with aiohttp.ClientSession() as session:
            for token, expected in (("new-token", 202), ("old-token", 202), ("other", 401)):
                async with session.post(
                    f"http://127.0.0.1:{receiver.port}/webhooks/acr",
                    json=acr_event(),
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    assert response.status == expected
    finally:
        await receiver.stop()


async def test_the_standby_forwards_to_the_leader_with_the_token_in_the_header_only() -> None:
    """forward_to is leader.LeaderElector.forward_target: the leader pod's IP from the API, or "" if unknown."""
    seen: list[tuple[str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append((request.path_qs, request.headers.get("Authorization", "")))
        response: web.StreamResponse = await handler(request)
        return response

    leader_sink = Sink()
    leader = Receiver(leader_sink, TOKEN, bind="127.0.0.1", port=0)
    app = leader.application()
    app.middlewares.insert(0, record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    target = f"127.0.0.1:{port}"
    standby = Receiver(Sink(), TOKEN, bind="127.0.0.1", port=0, forward_to=lambda: target)
    await standby.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{standby.port}/webhooks/acr"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with session.post(url, json=acr_event(), headers=auth) as response:
                assert response.status == 202
            async with session.post(url, json=acr_event(), headers={"Authorization": "Bearer wrong"}) as response:
                assert response.status == 401  # refused at the standby: nothing forwarded
            async with session.post(url, json=acr_event(), headers=auth, params={"token": TOKEN}) as response:
                assert response.status == 400  # a token in the URL never travels on
            target = ""  # the Lease names no pod that exists (or none): nobody to forward to
            async with session.post(url, json=acr_event(), headers=auth) as response:
                assert response.status == 503 and response.headers["Retry-After"]
        await leader.drain()
        assert seen == [("/webhooks/acr", f"Bearer {TOKEN}")]
        assert leader_sink.images == [("reg.azurecr.io", "a/b", "v1", DIGEST)]
    finally:
        await standby.stop()
        await runner.cleanup()
