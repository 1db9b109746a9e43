"""The local stack's Entra ID stand-in (modelapp_localstack/entra.py) without HTTP: the checks a real API
server's tokens cannot reach in a test (an expired or not-yet-valid assertion, an unknown issuer, an
algorithm it must not accept). tests/cluster/test_workload_identity.py runs it with the API server's tokens."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from modelapp_localstack.entra import ASSERTION_AUDIENCE, ASSERTION_TYPE, TokenAuthority, TokenRefused

pytestmark = pytest.mark.unit

ISSUER = "https://kubernetes.default.svc.cluster.local"
SUBJECT = "system:serviceaccount:ml:iris"
CLIENT_ID = "00000000-0000-0000-0000-0000000000a1"
TENANT = "00000000-0000-0000-0000-0000000000b2"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(issuer: str) -> dict[str, Any]:
    assert issuer == ISSUER
    public = jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True)
    return {"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}


def authority() -> TokenAuthority:
    stand_in = TokenAuthority(tenant_id=TENANT, issuer_keys=jwks)
    stand_in.add_federated_credential(CLIENT_ID, ISSUER, SUBJECT)
    return stand_in


def assertion(**changes: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": SUBJECT, "aud": [ASSERTION_AUDIENCE], "iat": now, "nbf": now, "exp": now + 600}
    claims.update(changes)
    return jwt.encode(claims, KEY, "RS256", headers={"kid": "k1"})


def form(token: str) -> dict[str, str]:
    return {
        "client_id": CLIENT_ID,
        "grant_type": "client_credentials",
        "scope": "https://storage.azure.com/.default",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": token,
    }


def refusal_code(token: str) -> int:
    with pytest.raises(TokenRefused) as refused:
        authority().token(TENANT, form(token))
    return refused.value.code


def test_a_valid_assertion_gets_a_storage_token_azurite_accepts() -> None:
    answer = authority().token(TENANT, form(assertion()))
    claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert claims["iss"] == f"https://sts.windows.net/{TENANT}/"
    assert claims["aud"] == "https://storage.azure.com"
    assert claims["appid"] == CLIENT_ID and claims["tid"] == TENANT
    assert claims["exp"] - claims["iat"] == answer["expires_in"]


def test_expired_and_not_yet_valid_assertions_are_refused() -> None:
    now = int(time.time())
    assert refusal_code(assertion(iat=now - 700, nbf=now - 700, exp=now - 100)) == 700024
    assert refusal_code(assertion(nbf=now + 300)) == 700024


def test_unknown_issuer_and_unsigned_assertions_are_refused() -> None:
    assert refusal_code(assertion(iss="https://issuer.example")) == 700211
    unsigned = jwt.encode(
        {"iss": ISSUER, "sub": SUBJECT, "aud": ASSERTION_AUDIENCE, "exp": time.time() + 60}, "", "none"
    )
    assert refusal_code(unsigned) == 700027
    assert refusal_code(assertion(aud="api://Other")) == 700212
