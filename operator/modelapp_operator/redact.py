"""Remove credentials from text before it reaches status, events or logs.

Error messages from the storage SDK, aiohttp and registries can echo connection
strings, SAS query strings, bearer tokens or URLs with user:password; every
message the operator publishes goes through `redact` first.
"""

from __future__ import annotations

import logging
import re

REDACTED = "***"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Connection-string secrets: AccountKey=...;SharedAccessSignature=...;
    (
        re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|SharedAccessKey|Password|Pwd)=([^;\s\"']+)"),
        rf"\1={REDACTED}",
    ),
    # SAS and other secret query parameters: ?sv=...&sig=...
    (
        re.compile(r"(?i)([?&](sig|signature|token|access_token|refresh_token|code|password)=)[^&\s\"'#]+"),
        rf"\1{REDACTED}",
    ),
    # Authorization headers and bearer/basic tokens.
    (re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {REDACTED}"),
    # Credentials inside URLs: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), rf"\1{REDACTED}@"),
    # JSON-ish secret fields: "password": "...", "auth": "...", "token": "..."
    (
        re.compile(
            r"(?i)(\"(?:password|auth|token|access_token|refresh_token|identitytoken|"
            r"connectionString)\"\s*:\s*\")[^\"]*\""
        ),
        rf'\1{REDACTED}"',
    ),
)


def redact(text: str) -> str:
    """Return text with anything that looks like a credential replaced by ***."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Logging filter that redacts the formatted message of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True
