"""Remove credentials from text before anyone else reads it: one set of rules for the operator (status, events,
logs) and the app (its termination message, which the operator shows in status).

Error messages from the storage SDK, aiohttp, registries and a crashing container's last lines can echo
connection strings, SAS query strings, bearer tokens, JWTs, URLs with user:password or environment variables
holding secrets; `redact` replaces each with ***. Standard library only.
"""

from __future__ import annotations

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
    # A JWT on its own (an access token printed without its scheme): header.payload.signature.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    # Credentials inside URLs: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), rf"\1{REDACTED}@"),
    # Environment variables that hold secrets, as a crashing program prints them: AZURE_CLIENT_SECRET=...
    (
        re.compile(r"\b([A-Z][A-Z0-9_]*(?:SECRET|PASSWORD|TOKEN|_KEY|CONNECTION_STRING))(\s*[=:]\s*)[^\s;&\"',]+"),
        rf"\1\2{REDACTED}",
    ),
    # JSON-ish secret fields: "password": "...", "auth": "...", "token": "..."
    (
        re.compile(
            r"(?i)(\"(?:password|auth|token|access_token|refresh_token|identitytoken|"
            r"connectionString|client_secret)\"\s*:\s*\")[^\"]*\""
        ),
        rf'\1{REDACTED}"',
    ),
)


def redact(text: str) -> str:
    """Return text with anything that looks like a credential replaced by ***."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
