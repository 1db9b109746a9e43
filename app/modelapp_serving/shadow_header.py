"""The pair a pod serves, as /metrics labels it and the ModelApp-Pair header names it on every /predict answer
(a shadowing stable pod counts answers per pair).

Apart from shadow.py so a pod that does not shadow never imports aiohttp.
"""

from __future__ import annotations

from modelapp_contract import container
from modelapp_contract.blob import normalize_etag


def served_pair(image: str | None, model_etag: str | None) -> tuple[str, str]:
    """(image digest, model version without quotes) of `repository@sha256:...` and an ETag; unknown: ""."""
    digest = image.rpartition("@")[2] if image and "@" in image else ""
    return digest, normalize_etag(model_etag) if model_etag else ""


def pair_header(image: str | None, model_etag: str | None) -> tuple[bytes, bytes] | None:
    """The ModelApp-Pair header a pod puts on its /predict answers: "<image digest>/<model version>"."""
    digest, version = served_pair(image, model_etag)
    if not digest or not version:
        return None
    return container.PAIR_HEADER.lower().encode(), f"{digest}/{version}".encode("ascii", "replace")
