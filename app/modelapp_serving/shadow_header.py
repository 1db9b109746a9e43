"""The ModelApp-Pair header: which pair answered a /predict (a shadowing stable pod counts answers per pair).

Apart from shadow.py so a pod that does not shadow never imports aiohttp.
"""

from __future__ import annotations

from modelapp_contract import container
from modelapp_contract.blob import normalize_etag


def pair_header(image: str | None, model_etag: str | None) -> tuple[bytes, bytes] | None:
    """The ModelApp-Pair header a pod puts on its /predict answers: "<image digest>/<model version>"."""
    digest = image.rpartition("@")[2] if image and "@" in image else ""
    if not digest or not model_etag:
        return None
    value = f"{digest}/{normalize_etag(model_etag)}"
    return container.PAIR_HEADER.lower().encode(), value.encode("ascii", "replace")
