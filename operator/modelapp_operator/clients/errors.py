"""Errors shared by the operator's clients of external systems."""

from __future__ import annotations

from modelapp_operator.redact import redact


class ResolutionError(Exception):
    """Something the spec names (an image tag, a model blob) could not be resolved now.

    `reason` becomes the matching condition's reason; the message is redacted, since it
    may quote a URL or a server's answer; `retry_after` is the backoff in seconds."""

    def __init__(self, reason: str, message: str, *, retry_after: float = 30.0) -> None:
        super().__init__(redact(message))
        self.reason = reason
        self.message = redact(message)
        self.retry_after = retry_after
