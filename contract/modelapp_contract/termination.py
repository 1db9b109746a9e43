"""How a serving container says why it stopped: its exit code and its termination message.

The app writes the message to /dev/termination-log and exits; the kubelet keeps both in the
container's state, where the operator reads them (operator plan/pods.py). A refusal names its kind,
so status can say which part failed (the model's checksum, its signature, loading it) and never
takes an image's crash output for a model refusal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

TERMINATION_LOG: Final = "/dev/termination-log"
# The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_MAX_BYTES: Final = 4096
# The worker that refuses the model exits with gunicorn's own "App failed to load" code; the gunicorn
# master then stops every worker and exits with the same code, so the container's exit code says it.
EXIT_MODEL_REFUSED: Final = 4


class RefusalKind:
    """Why a pod refused its pinned model. Each is also a word the operator shows in status."""

    CHECKSUM_MISMATCH: Final = "ModelChecksumMismatch"  # the bytes do not hash to the pinned sha256
    SIGNATURE_INVALID: Final = "ModelSignatureInvalid"  # unsigned, a bad signature, or signed for other bytes
    VERSION_CHANGED: Final = "ModelVersionChanged"  # the blob no longer has the pinned ETag (HTTP 412)
    CANNOT_LOAD: Final = "ModelCannotLoad"  # verified bytes that the runtime cannot load as a model
    CACHE_UNUSABLE: Final = "ModelCacheUnusable"  # the pod cannot write the model to its cache volume
    CANNOT_FETCH: Final = "ModelCannotFetch"  # the download failed in a way retrying cannot mend
    ALL: Final = (CHECKSUM_MISMATCH, SIGNATURE_INVALID, VERSION_CHANGED, CANNOT_LOAD, CACHE_UNUSABLE, CANNOT_FETCH)


@dataclass(frozen=True)
class Refusal:
    kind: str
    reason: str

    def message(self) -> str:
        """The termination message: `model refused (<kind>): <reason>`, within the kubelet's limit."""
        text = f"model refused ({self.kind}): {' '.join(self.reason.split())}"
        encoded = text.encode()
        if len(encoded) <= TERMINATION_MESSAGE_MAX_BYTES:
            return text
        return encoded[: TERMINATION_MESSAGE_MAX_BYTES - 3].decode(errors="ignore") + "..."


_REFUSAL = re.compile(r"\Amodel refused \((?P<kind>[A-Za-z]+)\): (?P<reason>.*)\Z", re.DOTALL)


def parse_refusal(message: str) -> Refusal | None:
    """The refusal a termination message states, or None when it is anything else (an image's own
    output, taken from its logs by FallbackToLogsOnError, is never read as a refusal)."""
    match = _REFUSAL.match(message.strip())
    if match is None or match["kind"] not in RefusalKind.ALL:
        return None
    return Refusal(match["kind"], match["reason"].strip())
