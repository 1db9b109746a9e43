"""Webhook payload parsing: ACR webhooks, distribution notifications, Event Grid (both schemas).

Payloads follow the documented shapes (ACR webhook reference, distribution's notifications
docs, Event Grid's storage and container registry event schemas), with our own values."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from modelapp_operator.receiver.payloads import (
    BlobChanged,
    EventGridBatch,
    ImagePushed,
    PayloadError,
    parse_acr_event,
    parse_eventgrid,
    parse_registry_envelope,
)

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "3f" * 32
LAYER = "sha256:" + "1c" * 32


def acr_push(**target: Any) -> dict[str, Any]:
    return {
        "id": "9b2e4a51-7d1c-4c47-9f3c-2a6e0c1d5b77",
        "timestamp": "2024-05-02T09:14:07.118203401Z",
        "action": "push",
        "target": {
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "size": 1042,
            "digest": DIGEST,
            "length": 1042,
            "repository": "team/iris-api",
            "tag": "stable",
            **target,
        },
        "request": {
            "id": "c0ffee00-1111-4a2b-8c3d-445566778899",
            "host": "modelappdemo.azurecr.io",
            "method": "PUT",
            "useragent": "buildah/1.28 (linux/amd64)",
        },
    }


def registry_envelope() -> dict[str, Any]:
    host = "127.0.0.1:5443"
    base = {
        "timestamp": "2024-05-02T09:14:07.5Z",
        "request": {"id": "r1", "addr": "127.0.0.1:40112", "host": host, "method": "PUT", "useragent": "py"},
        "actor": {"name": "modelapp"},
        "source": {"addr": "builder:5443", "instanceID": "0d7f"},
    }
    layer = {
        **base,
        "id": "e1",
        "action": "push",
        "target": {
            "mediaType": "application/octet-stream",
            "size": 180,
            "digest": LAYER,
            "length": 180,
            "repository": "team/iris-api",
            "url": f"https://{host}/v2/team/iris-api/blobs/{LAYER}",
        },
    }
    manifest = {
        **base,
        "id": "e2",
        "action": "push",
        "target": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "size": 402,
            "digest": DIGEST,
            "length": 402,
            "repository": "team/iris-api",
            "url": f"https://{host}/v2/team/iris-api/manifests/{DIGEST}",
            "tag": "stable",
        },
    }
    pull = copy.deepcopy(manifest) | {"id": "e3", "action": "pull"}
    return {"events": [layer, manifest, pull, copy.deepcopy(manifest) | {"id": "e4"}]}


def blob_created(**data: Any) -> dict[str, Any]:
    return {
        "topic": "/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/ml/providers/"
        "Microsoft.Storage/storageAccounts/modelstore",
        "subject": "/blobServices/default/containers/models/blobs/iris/v2/model.onnx",
        "eventType": "Microsoft.Storage.BlobCreated",
        "id": "5fbc2a1e-801e-0059-2b4f-9c1f6a06b3e1",
        "eventTime": "2024-05-02T09:20:00.1234567Z",
        "data": {
            "api": "PutBlockList",
            "clientRequestId": "a1b2c3d4-0000-4000-8000-000000000001",
            "requestId": "5fbc2a1e-801e-0059-2b4f-9c1f6a000000",
            "eTag": "0x8DC6A7E5F1B2C3D",
            "contentType": "application/octet-stream",
            "contentLength": 48213,
            "blobType": "BlockBlob",
            "url": "https://modelstore.blob.core.windows.net/models/iris/v2/model.onnx",
            "sequencer": "0000000000000000000000000000649E000000000003d1c4",
            "storageDiagnostics": {"batchId": "b68529f3-68cd-4744-baa4-3c0498ec19f0"},
            **data,
        },
        "dataVersion": "",
        "metadataVersion": "1",
    }


def image_pushed() -> dict[str, Any]:
    return {
        "id": "831e1650-001e-001b-66ab-eeb76e069631",
        "topic": "/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/ml/providers/"
        "Microsoft.ContainerRegistry/registries/modelappdemo",
        "subject": "team/iris-api:stable",
        "eventType": "Microsoft.ContainerRegistry.ImagePushed",
        "eventTime": "2024-05-02T09:14:07.2Z",
        "data": {
            "id": "831e1650-001e-001b-66ab-eeb76e069631",
            "timestamp": "2024-05-02T09:14:07.118Z",
            "action": "push",
            "target": {
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "size": 3023,
                "digest": DIGEST,
                "length": 3023,
                "repository": "team/iris-api",
                "tag": "stable",
            },
            "request": {"id": "r9", "host": "modelappdemo.azurecr.io", "method": "PUT", "useragent": "docker"},
        },
        "dataVersion": "1.0",
        "metadataVersion": "1",
    }


def validation() -> dict[str, Any]:
    return {
        "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
        "topic": "/subscriptions/00000000-1111-2222-3333-444444444444",
        "subject": "",
        "data": {
            "validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
            "validationUrl": "https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/modelapp/validate?id=x",
        },
        "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": "2024-05-02T09:00:00Z",
        "metadataVersion": "1",
        "dataVersion": "1",
    }


def test_acr_push_event() -> None:
    assert parse_acr_event(acr_push()) == [ImagePushed("modelappdemo.azurecr.io", "team/iris-api", "stable", DIGEST)]


def test_acr_events_that_move_no_tag_are_ignored() -> None:
    assert parse_acr_event(acr_push() | {"action": "delete"}) == []
    assert parse_acr_event({"id": "x", "timestamp": "t", "action": "ping"}) == []
    untagged = acr_push()
    del untagged["target"]["tag"]
    assert parse_acr_event(untagged) == []


def test_acr_event_without_host_uses_default_and_odd_digest_is_unknown() -> None:
    event = acr_push(digest="md5:abc")
    del event["request"]
    assert parse_acr_event(event, default_host="fallback.azurecr.io") == [
        ImagePushed("fallback.azurecr.io", "team/iris-api", "stable", None)
    ]
    assert parse_acr_event(event) == [ImagePushed(None, "team/iris-api", "stable", None)]


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([], "the body is missing or not a JSON object"),
        ({"target": {}}, "action is missing"),
        ({"action": "push"}, "target is missing or not a JSON object"),
        ({"action": "push", "target": {"tag": "v1"}}, "event.target.repository is missing"),
        ({"action": "push", "target": {"tag": "../x", "repository": "r"}}, "event.target.tag is not a valid tag"),
    ],
)
def test_acr_malformed(document: Any, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem.replace(".", r"\.")):
        parse_acr_event(document)


def test_registry_envelope_keeps_tagged_manifest_pushes_once() -> None:
    assert parse_registry_envelope(registry_envelope()) == [
        ImagePushed("127.0.0.1:5443", "team/iris-api", "stable", DIGEST)
    ]


def test_registry_event_host_falls_back_to_target_url() -> None:
    envelope = registry_envelope()
    for event in envelope["events"]:
        del event["request"]
    assert parse_registry_envelope(envelope)[0].host == "127.0.0.1:5443"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"event": []}, "events is missing or not a list"),
        ({"events": ["x"]}, r"events\[0\] is missing or not a JSON object"),
        ({"events": [{"action": "push"}]}, r"events\[0\]\.target is missing"),
        ("events", "the body is missing or not a JSON object"),
    ],
)
def test_registry_malformed(document: Any, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        parse_registry_envelope(document)


def test_eventgrid_blob_created_and_image_pushed() -> None:
    batch = parse_eventgrid([blob_created(), image_pushed(), blob_created()])
    assert batch == EventGridBatch(
        changes=(
            BlobChanged(
                "https://modelstore.blob.core.windows.net", "models", "iris/v2/model.onnx", "0x8DC6A7E5F1B2C3D"
            ),
            ImagePushed("modelappdemo.azurecr.io", "team/iris-api", "stable", DIGEST),
        ),
    )


def test_eventgrid_blob_without_url_uses_subject_and_topic() -> None:
    event = blob_created()
    del event["data"]["url"]
    (change,) = parse_eventgrid([event]).changes
    assert change == BlobChanged("modelstore", "models", "iris/v2/model.onnx", "0x8DC6A7E5F1B2C3D")


def test_eventgrid_azurite_style_url() -> None:
    event = blob_created(url="http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx", eTag='"0x1"')
    (change,) = parse_eventgrid([event]).changes
    assert change == BlobChanged("http://127.0.0.1:10000/devstoreaccount1", "models", "iris.onnx", '"0x1"')


def test_eventgrid_validation_handshake() -> None:
    batch = parse_eventgrid([validation()])
    assert batch.validation_code == "512d38b6-c7b8-40c8-89fe-f46f9e9622b6" and batch.changes == ()


def test_eventgrid_cloudevents_single_and_batch() -> None:
    event = blob_created()
    cloud = {
        "specversion": "1.0",
        "type": event["eventType"],
        "source": event["topic"],
        "subject": event["subject"],
        "id": event["id"],
        "time": event["eventTime"],
        "data": event["data"],
    }
    assert parse_eventgrid(cloud).changes == parse_eventgrid([event]).changes
    assert parse_eventgrid([cloud, cloud]).changes == parse_eventgrid([event]).changes


def test_eventgrid_other_events_are_ignored() -> None:
    deleted = blob_created() | {"eventType": "Microsoft.Storage.BlobDeleted"}
    assert parse_eventgrid([deleted]) == EventGridBatch(changes=(), ignored=1)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("x", "not an event array"),
        ([{"data": {}}], r"events\[0\] has no eventType"),
        ([blob_created(url="ftp://x")], r"events\[0\]\.data\.url is not a blob URL"),
        ([validation() | {"data": {}}], r"validationCode is missing"),
        ([image_pushed() | {"data": {"target": "x"}}], r"events\[0\]\.data\.target is missing"),
    ],
)
def test_eventgrid_malformed(document: Any, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        parse_eventgrid(document)
