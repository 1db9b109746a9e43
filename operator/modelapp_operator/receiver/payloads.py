"""Webhook payloads as change records: ACR webhooks, distribution notifications and Event Grid deliveries.

Pure: no I/O. Each parser takes a decoded JSON document and returns the image pushes and blob
writes it announces (ImagePushed, BlobChanged), or raises PayloadError naming what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from modelapp_contract.blob import try_parse_blob_url

REGISTRY_EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
    }
)
EVENTGRID_VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
EVENTGRID_BLOB_CREATED = "Microsoft.Storage.BlobCreated"
EVENTGRID_IMAGE_PUSHED = "Microsoft.ContainerRegistry.ImagePushed"

# --- change records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePushed:
    host: str | None  # registry host[:port]; None when the event does not say
    repository: str  # path inside the registry
    tag: str
    digest: str | None


@dataclass(frozen=True)
class BlobChanged:
    account: str  # account URL (normalized) or, when only that is known, the account name
    container: str
    blob: str
    etag: str | None


Change = ImagePushed | BlobChanged


@dataclass(frozen=True)
class EventGridBatch:
    changes: tuple[Change, ...]
    validation_code: str | None = None
    ignored: int = 0


class PayloadError(ValueError):
    """The body is not what the route expects; the message names the problem (never echoes secrets)."""


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{what} is missing or not a JSON object")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(f"{what} is missing or not a non-empty string")
    return value.strip()


def _optional_text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _digest(value: Any) -> str | None:
    """A digest we can trust to compare; anything else means "unknown, re-resolve"."""
    return value if isinstance(value, str) and _DIGEST.match(value) else None


def _host(request: Any, url: Any = None) -> str | None:
    host = _optional_text(request.get("host")) if isinstance(request, dict) else None
    if host is None and isinstance(url, str):
        host = urlsplit(url).netloc or None
    return host.lower() if host else None


def _image_event(
    action: Any, target: Mapping[str, Any], request: Any, default_host: str | None, *, where: str
) -> ImagePushed | None:
    if action != "push":
        return None
    media_type = target.get("mediaType")
    if isinstance(media_type, str) and media_type and media_type not in _MANIFEST_TYPES:
        return None  # a layer or config blob: no tag moved
    tag = _optional_text(target.get("tag"))
    if tag is None:
        return None  # pushed by digest: no tag moved
    if not _TAG.match(tag):
        raise PayloadError(f"{where}.target.tag is not a valid tag")
    repository = _text(target.get("repository"), f"{where}.target.repository")
    host = _host(request, target.get("url")) or default_host
    return ImagePushed(host=host, repository=repository, tag=tag, digest=_digest(target.get("digest")))


def parse_acr_event(document: Any, *, default_host: str | None = None) -> list[ImagePushed]:
    """An ACR webhook body: one event. Only `push` of a tag matters (not delete, ping, quarantine...)."""
    event = _object(document, "the body")
    action = event.get("action")
    if not isinstance(action, str):
        raise PayloadError("action is missing or not a string")
    if action != "push":
        return []
    target = _object(event.get("target"), "target")
    pushed = _image_event(action, target, event.get("request"), default_host, where="event")
    return [pushed] if pushed else []


def parse_registry_envelope(document: Any, *, default_host: str | None = None) -> list[ImagePushed]:
    """A distribution notification envelope: {"events": [...]}; manifest pushes with a tag matter."""
    envelope = _object(document, "the body")
    events = envelope.get("events")
    if not isinstance(events, list):
        raise PayloadError("events is missing or not a list")
    changes: list[ImagePushed] = []
    for index, item in enumerate(events):
        event = _object(item, f"events[{index}]")
        if event.get("action") != "push":
            continue
        target = _object(event.get("target"), f"events[{index}].target")
        pushed = _image_event("push", target, event.get("request"), default_host, where=f"events[{index}]")
        if pushed is not None and pushed not in changes:
            changes.append(pushed)
    return changes


_SUBJECT_BLOB = re.compile(r"^/blobServices/default/containers/([^/]+)/blobs/(.+)$")
_TOPIC_ACCOUNT = re.compile(r"/storageAccounts/([^/]+)$", re.IGNORECASE)


def _blob_change(event: Mapping[str, Any], data: Mapping[str, Any], where: str) -> BlobChanged:
    etag = _optional_text(data.get("eTag"))
    url = data.get("url")
    if isinstance(url, str):
        address = try_parse_blob_url(url)
        if address is None:
            raise PayloadError(f"{where}.data.url is not a blob URL")
        return BlobChanged(address.account_url, address.container, address.blob, etag)
    # No URL: subject names container and blob, topic (or source) the account.
    subject = event.get("subject")
    topic = event.get("topic") or event.get("source")
    match = _SUBJECT_BLOB.match(subject) if isinstance(subject, str) else None
    account = _TOPIC_ACCOUNT.search(topic) if isinstance(topic, str) else None
    if match is None or account is None:
        raise PayloadError(f"{where} has neither data.url nor a blob subject and storage account topic")
    return BlobChanged(account.group(1).lower(), match.group(1), match.group(2), etag)


def parse_eventgrid(document: Any, *, default_host: str | None = None) -> EventGridBatch:
    """Event Grid delivery: an array of events (Event Grid schema) or CloudEvents (one object or an array).

    Returns the changes, or the validation code when the batch is the subscription handshake."""
    events = document if isinstance(document, list) else [document] if isinstance(document, dict) else None
    if events is None:
        raise PayloadError("the body is not an event array or an event object")
    changes: list[Change] = []
    ignored = 0
    for index, item in enumerate(events):
        where = f"events[{index}]"
        event = _object(item, where)
        event_type = event.get("eventType", event.get("type"))
        if not isinstance(event_type, str):
            raise PayloadError(f"{where} has no eventType (Event Grid schema) or type (CloudEvents)")
        data = event.get("data")
        if event_type == EVENTGRID_VALIDATION:
            code = _text(_object(data, f"{where}.data").get("validationCode"), f"{where}.data.validationCode")
            return EventGridBatch(changes=(), validation_code=code)
        if event_type == EVENTGRID_BLOB_CREATED:
            change: Change | None = _blob_change(event, _object(data, f"{where}.data"), where)
        elif event_type == EVENTGRID_IMAGE_PUSHED:
            body = _object(data, f"{where}.data")
            target = _object(body.get("target"), f"{where}.data.target")
            change = _image_event("push", target, body.get("request"), default_host, where=f"{where}.data")
        else:
            change = None
        if change is None:
            ignored += 1
        elif change not in changes:
            changes.append(change)
    return EventGridBatch(changes=tuple(changes), ignored=ignored)
