"""Credentials never reach status, events or logs."""

from __future__ import annotations

import logging

import pytest
from modelapp_operator.redact import RedactingFilter, redact

pytestmark = pytest.mark.unit

KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};BlobEndpoint=x", KEY),
        ("BlobEndpoint=https://a.blob.core.windows.net;SharedAccessSignature=sv=2020&sig=abcDEF123%3D", "abcDEF123"),
        ("GET https://a.blob.core.windows.net/c/b?sv=2021-08-06&se=2030&sig=s3cr3tSig%2F1 failed", "s3cr3tSig"),
        ("Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.payload.signature", "eyJhbGciOiJSUzI1NiJ9"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("cannot reach https://bob:hunter2@registry.example.com/v2/", "hunter2"),
        ('{"auths": {"r": {"auth": "dXNlcjpwYXNz", "password": "pw123"}}}', "pw123"),
        ("token endpoint said ?access_token=abc.def.ghi&x=1", "abc.def.ghi"),
    ],
)
def test_redact_removes_secret(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned
    assert "***" in cleaned


def test_redact_keeps_ordinary_text() -> None:
    text = 'blob models/iris.onnx version "0x8DC1" sha256 ' + "a" * 64
    assert redact(text) == text


def test_logging_filter(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.redact")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="test.redact"):
        logger.info("connecting with %s", f"AccountKey={KEY}")
    assert KEY not in caplog.text and "AccountKey=***" in caplog.text
