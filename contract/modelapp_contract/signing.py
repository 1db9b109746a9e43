"""OpenSSF model signing (PyPI `model-signing`, key mode, offline) for one model file.

Shared by the publisher (sign), the operator (verify before a rollout) and the app (verify before
loading). A signature is a sigstore bundle whose in-toto statement lists one resource, ".", the
model file itself, with its sha256: so verifying the bundle against the public key yields the
sha256 the bytes must have, and the caller compares it with the bytes it hashed (the app) or takes
it as the expected sha256 (the operator). The bundle travels base64 in the blob's metadata
(blob.METADATA_SIGNATURE), so it is part of the same immutable version as the bytes.

model-signing reads keys and bundles from files only: both are written to a private temporary
directory for the call, which blocks: the operator runs it in a thread, off its event loop.

Importing this module needs the standard library only, like the rest of the contract: model-signing and
cryptography (which both images install, as the `operator` and `app` extras) are imported by the calls
that sign or verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SHA256 = re.compile(r"^[a-f0-9]{64}$")


class SignatureError(Exception):
    """The signature is missing, malformed, made with another key, or does not cover one model file."""


@dataclass(frozen=True)
class VerifiedSignature:
    sha256: str  # the model file's sha256 as the signed manifest states it
    signer: str  # the public key's fingerprint: SHA256:<hex of the DER SubjectPublicKeyInfo>


def key_fingerprint(public_key_pem: bytes) -> str:
    """SHA256:<hex> of the public key's DER SubjectPublicKeyInfo (what status shows as the signer)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see the module's doc

    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except (ValueError, TypeError) as error:
        raise SignatureError(f"the public key is not a PEM public key: {error}") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"SHA256:{hashlib.sha256(der).hexdigest()}"


def sign_model_file(model: Path, private_key: Path) -> bytes:
    """The signature bundle (JSON bytes) of one model file, signed with an EC private key (PEM)."""
    from model_signing.signing import Config  # noqa: PLC0415 - see the module's doc

    with tempfile.TemporaryDirectory(prefix="modelapp-sign-") as folder:
        bundle = Path(folder) / "model.sig"
        try:
            Config().use_elliptic_key_signer(private_key=private_key).sign(model, bundle)  # type: ignore[no-untyped-call]
        except (ValueError, OSError) as error:
            raise SignatureError(f"signing {model.name} failed: {error}") from None
        return bundle.read_bytes()


def encode_bundle(bundle: bytes) -> str:
    return base64.b64encode(bundle).decode("ascii")


def decode_bundle(encoded: str) -> bytes:
    try:
        return base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the signature metadata is not base64") from None


def verify_signature(bundle: bytes, public_key_pem: bytes) -> VerifiedSignature:
    """Verify the bundle against the public key; return the model file's signed sha256 and the signer.

    Raises SignatureError when the bundle is malformed, was made with another key, or does not
    describe exactly one file (a signed directory is not a model file)."""
    from model_signing._signing.sign_sigstore_pb import Signature  # noqa: PLC0415
    from model_signing.verifying import Config  # noqa: PLC0415

    signer = key_fingerprint(public_key_pem)
    with tempfile.TemporaryDirectory(prefix="modelapp-verify-") as folder:
        key_path, bundle_path = Path(folder) / "key.pem", Path(folder) / "model.sig"
        key_path.write_bytes(public_key_pem)
        bundle_path.write_bytes(bundle)
        try:
            config = Config().use_elliptic_key_verifier(public_key=key_path)  # type: ignore[no-untyped-call]
            # The public verify() hashes a file on disk; the operator has no file, only the bundle:
            # the configured verifier checks the bundle and returns the signed manifest.
            verifier: Any = config._verifier
            manifest = verifier.verify(Signature.read(bundle_path))
        except Exception as error:  # the library raises ValueError, its own and protobuf's errors
            text = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise SignatureError(f"the signature does not verify with key {signer}: {text}") from None
    resources = list(manifest.resource_descriptors())
    if len(resources) != 1 or resources[0].identifier != ".":
        names = ", ".join(str(r.identifier) for r in resources[:3])
        raise SignatureError(f"the signature covers {len(resources)} files ({names}), not one model file")
    digest = resources[0].digest
    if digest.algorithm != "sha256" or not _SHA256.match(digest.digest_hex):
        raise SignatureError(f"the signature's digest is {digest.algorithm}, not sha256")
    return VerifiedSignature(sha256=digest.digest_hex, signer=signer)
