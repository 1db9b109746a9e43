"""What a pod says reaches status redacted (plan/pods.py): secrets, tokens and SAS URLs a crashing container
printed, in its termination message, its refusal or the kubelet's messages, never enter status or history."""

from __future__ import annotations

import pytest
from modelapp_contract.redact import redact
from modelapp_contract.termination import EXIT_MODEL_REFUSED, Refusal, RefusalKind
from modelapp_operator.plan.pods import diagnose_pods

from tests.unit.test_operator_pods import deployment, ended, pod

pytestmark = pytest.mark.unit

KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3N0b3JhZ2UuYXp1cmUuY29tIn0.c2lnbmF0dXJlc2lnbmF0dXJl"
SECRETS = {
    "connection string": (f"DefaultEndpointsProtocol=https;AccountName=a;AccountKey={KEY};", KEY),
    "SAS URL": (
        "GET https://a.blob.core.windows.net/m/x.onnx?sv=2022-11-02&sp=r&sig=S3cretSig%2Bq%3D failed",
        "S3cretSig",
    ),
    "bearer token": (f"Authorization: Bearer {JWT}", JWT),
    "bare JWT": (f"token was {JWT}", JWT),
    "secret env": ("AZURE_CLIENT_SECRET=Zq8~s3cr3t.value", "Zq8~s3cr3t.value"),
    "URL password": ("cannot reach https://ci:hunter2pw@registry.example.com/v2/", "hunter2pw"),
}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_a_crashing_containers_output_is_redacted(name: str) -> None:
    text, secret = SECRETS[name]
    output = f"Traceback (most recent call last):\n  File app.py\nRuntimeError: {text}\n"
    found = diagnose_pods(deployment(), [pod("iris-a", ended(1, output))])
    assert found is not None
    assert secret not in found.message and "***" in found.message


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_a_refusal_is_redacted(name: str) -> None:
    text, secret = SECRETS[name]
    refusal = Refusal(RefusalKind.CANNOT_LOAD, f"cannot download the model: {text}").message()
    found = diagnose_pods(deployment(), [pod("iris-a", ended(EXIT_MODEL_REFUSED, refusal))])
    assert found is not None and found.problem.refusal is not None
    assert secret not in found.message and secret not in found.problem.message


def test_a_secret_cut_by_the_bound_on_output_is_still_redacted() -> None:
    """The output keeps its last 300 characters: a JWT across that cut is redacted before the cut."""
    output = "x" * 500 + " " + JWT + " " + "y" * 250
    found = diagnose_pods(deployment(), [pod("iris-a", ended(1, output))])
    assert found is not None
    for part in JWT.split("."):
        assert part[-12:] not in found.message


def test_the_kubelets_messages_are_redacted() -> None:
    waiting = {"state": {"waiting": {"reason": "ErrImagePull", "message": "pull https://u:pw12345@r.example/x: 401"}}}
    found = diagnose_pods(deployment(), [pod("iris-a", waiting)])
    assert found is not None and "pw12345" not in found.message


def test_ordinary_output_is_kept() -> None:
    text = "model iris.onnx sha256 " + "a" * 64 + " version 0x8DC1 loaded in 0.3 s; MODELAPP_MODEL_FORMAT: onnx"
    assert redact(text) == text
