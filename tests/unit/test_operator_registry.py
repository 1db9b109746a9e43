"""Registry pieces that need no network: challenge parsing and pull-Secret credentials."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from modelapp_operator.clients.registry import (
    Challenge,
    ImageResolutionError,
    RegistryClient,
    RegistryCredentials,
    credentials_from_dockerconfig,
    parse_challenge,
)

pytestmark = pytest.mark.unit


def test_parse_bearer_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert parse_challenge(header) == Challenge(
        scheme="bearer",
        params={
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/busybox:pull",
        },
    )


def test_parse_basic_and_unquoted_challenges() -> None:
    assert parse_challenge('Basic realm="Registry Realm"') == Challenge("basic", {"realm": "Registry Realm"})
    assert parse_challenge("Bearer realm=https://x/token, service=x") == Challenge(
        "bearer", {"realm": "https://x/token", "service": "x"}
    )
    assert parse_challenge("") is None


def _config(auths: dict[str, object]) -> str:
    return json.dumps({"auths": auths})


def test_credentials_from_auth_field_and_host_normalization() -> None:
    auth = base64.b64encode(b"alice:pa:ss").decode()
    config = _config({"https://127.0.0.1:5000/v1/": {"auth": auth}})
    assert credentials_from_dockerconfig(config, "127.0.0.1:5000") == RegistryCredentials("alice", "pa:ss")
    assert credentials_from_dockerconfig(config, "other.example.com") is None


def test_credentials_from_username_password_and_identity_token() -> None:
    config = _config({"r.example.com": {"username": "u", "password": "p"}, "acr.azurecr.io": {"identitytoken": "rt"}})
    assert credentials_from_dockerconfig(config, "r.example.com") == RegistryCredentials("u", "p")
    assert credentials_from_dockerconfig(config.encode(), "acr.azurecr.io") == RegistryCredentials(
        "00000000-0000-0000-0000-000000000000", "rt"
    )


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        json.dumps({"nope": 1}),
        _config({"r.example.com": {"auth": "%%%"}}),
        _config({"r.example.com": {"auth": base64.b64encode(b"nocolon").decode()}}),
    ],
)
def test_bad_docker_config_is_a_value_error_without_the_secret(document: str) -> None:
    with pytest.raises(ValueError) as caught:
        credentials_from_dockerconfig(document, "r.example.com")
    assert "%%%" not in str(caught.value)


def test_password_not_in_repr() -> None:
    assert "hunter2" not in repr(RegistryCredentials("u", "hunter2"))


# --- the token (Bearer) flow, against an in-process HTTP endpoint speaking the distribution auth protocol.
# The local registry of the integration tests uses htpasswd (Basic); ACR and Docker Hub use this flow.

DIGEST = "sha256:" + "e" * 64


async def _token_registry(*, digest_header: bool = True) -> tuple[TestServer, dict[str, int]]:
    calls = {"token": 0, "manifest": 0}
    manifest = b'{"schemaVersion":2}'

    async def token(request: web.Request) -> web.Response:
        calls["token"] += 1
        if request.headers.get("Authorization") != "Basic " + base64.b64encode(b"alice:s3cret").decode():
            return web.json_response({"errors": []}, status=401)
        assert request.query["scope"] == "repository:team/iris:pull"
        assert request.query["service"] == "test-registry"
        return web.json_response({"token": "tok-123", "expires_in": 300})

    async def manifests(request: web.Request) -> web.Response:
        calls["manifest"] += 1
        if request.headers.get("Authorization") != "Bearer tok-123":
            realm = f"http://{request.host}/token"
            challenge = f'Bearer realm="{realm}",service="test-registry",scope="repository:team/iris:pull"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        assert "application/vnd.oci.image.index.v1+json" in request.headers["Accept"]
        if request.match_info["tag"] != "1.0":
            return web.Response(status=404)
        headers = {"Docker-Content-Digest": DIGEST} if digest_header else {}
        return web.Response(body=manifest if request.method == "GET" else None, headers=headers)

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_route("*", "/v2/team/iris/manifests/{tag}", manifests)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, calls


async def test_bearer_flow_with_basic_credentials_and_token_cache() -> None:
    server, calls = await _token_registry()
    host = f"127.0.0.1:{server.port}"
    client = RegistryClient(insecure_hosts=frozenset({host}))
    try:
        credentials = RegistryCredentials("alice", "s3cret")
        assert await client.resolve(f"{host}/team/iris", "1.0", credentials) == DIGEST
        assert calls == {"token": 1, "manifest": 2}
        assert await client.resolve(f"{host}/team/iris", "1.0", credentials) == DIGEST
        assert calls == {"token": 1, "manifest": 3}  # the cached token went first
        with pytest.raises(ImageResolutionError) as missing:
            await client.resolve(f"{host}/team/iris", "2.0", credentials)
        assert missing.value.reason == "ImageNotFound"
        with pytest.raises(ImageResolutionError) as refused:
            await client.resolve(f"{host}/team/iris", "1.0", RegistryCredentials("alice", "wrong"))
        assert refused.value.reason == "RegistryUnauthorized" and "wrong" not in refused.value.message
    finally:
        await client.close()
        await server.close()


async def test_digest_computed_when_header_missing() -> None:
    server, _ = await _token_registry(digest_header=False)
    host = f"127.0.0.1:{server.port}"
    client = RegistryClient(insecure_hosts=frozenset({host}))
    try:
        digest = await client.resolve(f"{host}/team/iris", "1.0", RegistryCredentials("alice", "s3cret"))
        assert digest == "sha256:" + hashlib.sha256(b'{"schemaVersion":2}').hexdigest()
    finally:
        await client.close()
        await server.close()


async def test_unreachable_registry_is_temporary() -> None:
    client = RegistryClient(insecure_hosts=frozenset({"127.0.0.1:9"}), timeout_seconds=2)
    try:
        with pytest.raises(ImageResolutionError) as caught:
            await client.resolve("127.0.0.1:9/team/iris", "1.0", None)
        assert caught.value.reason == "RegistryUnavailable" and caught.value.retry_after > 0
    finally:
        await client.close()
