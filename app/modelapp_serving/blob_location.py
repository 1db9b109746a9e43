"""Split a blob URL into account URL, container and blob name; strip credentials for display."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

# Azurite and the storage emulator put the account name in the path: http://host:port/<account>/<container>/...
EMULATOR_ACCOUNT = "devstoreaccount1"


@dataclass(frozen=True)
class BlobLocation:
    account_url: str
    """`https://acct.blob.core.windows.net` or `http://127.0.0.1:10000/devstoreaccount1`, no query."""
    container: str
    blob: str

    @property
    def url(self) -> str:
        """The blob URL without any query string (SAS tokens never leave this module)."""
        return f"{self.account_url}/{self.container}/{quote(self.blob)}"


def parse_blob_url(url: str) -> BlobLocation:
    """Parse a full blob URL; raise ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) blob URL: {redact_url(url)!r}")
    if parts.username or parts.password:
        raise ValueError("the blob URL must not carry a user name or password")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    account_path = ""
    if segments and segments[0] == EMULATOR_ACCOUNT:
        account_path = "/" + segments.pop(0)
    if len(segments) < 2:
        raise ValueError(f"the blob URL needs a container and a blob name: {redact_url(url)!r}")
    account_url = urlunsplit((parts.scheme, parts.netloc, account_path, "", ""))
    return BlobLocation(account_url=account_url, container=segments[0], blob="/".join(segments[1:]))


def redact_url(url: str) -> str:
    """Drop the query string and fragment (a SAS token is a credential) and any user info."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
