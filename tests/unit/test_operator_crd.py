"""The CRD: names, printer columns, a description on every field, defaults that match the typed model, caps on size."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_operator.api.modelapp_types import ENV_MAX_CHARACTERS, SpecError, parse_modelapp
from modelapp_operator.names import API_VERSION, GROUP, KIND, PLURAL, VERSION

pytestmark = pytest.mark.unit

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "modelapp.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())  # type: ignore[no-any-return]


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def test_names(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (KIND, PLURAL, ["ma"], ["all"])
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert f"{crd['spec']['group']}/{version['name']}" == API_VERSION == f"{GROUP}/{VERSION}"
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }


def test_every_field_has_a_description(crd: dict[str, Any]) -> None:
    missing = [
        path for path, node in walk(schema_of(crd), "") if path not in ("", ".metadata") and not node.get("description")
    ]
    assert missing == []


def test_cel_rules_have_messages(crd: dict[str, Any]) -> None:
    rules = [rule for _, node in walk(schema_of(crd), "") for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 8
    assert all(rule.get("message") for rule in rules)


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Digest"] == ".status.image.shortDigest"
    assert columns["Model"] == ".status.model.version"
    assert columns["Replicas"] == ".status.replicaSummary"
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"] == ".metadata.creationTimestamp"
    status = schema_of(crd)["properties"]["status"]["properties"]
    for path in (".status.image.shortDigest", ".status.model.version", ".status.replicaSummary"):
        node: dict[str, Any] = {"properties": status}
        for part in path.split(".")[2:]:
            node = node["properties"][part]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it (enough for this schema)."""
    if isinstance(value, dict):
        for name, child in (schema.get("properties") or {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(child, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def test_crd_defaults_match_the_typed_model(crd: dict[str, Any]) -> None:
    body: dict[str, Any] = {
        "metadata": {"name": "iris", "namespace": "ml", "uid": "u"},
        "spec": {
            "image": {"repository": "127.0.0.1:5000/iris", "tag": "1"},
            "model": {
                "blob": {"accountUrl": "https://a.blob.core.windows.net", "container": "models", "name": "m.onnx"},
                "credentials": {"secretRef": {"name": "s"}},
            },
        },
    }
    defaulted = copy.deepcopy(body)
    defaulted["spec"] = apply_defaults(schema_of(crd)["properties"]["spec"], defaulted["spec"])
    assert defaulted["spec"]["rollout"]["progressDeadlineSeconds"] == 600
    assert parse_modelapp(defaulted).spec == parse_modelapp(body).spec


def test_docs_example_is_a_valid_modelapp(crd: dict[str, Any]) -> None:
    docs = (CRD_PATH.parents[1] / "docs" / "modelapp-spec.md").read_text()
    example = yaml.safe_load(docs.split("```yaml", 1)[1].split("```", 1)[0])
    assert example["apiVersion"] == API_VERSION and example["kind"] == KIND
    example["metadata"]["uid"] = "u"
    example["spec"] = apply_defaults(schema_of(crd)["properties"]["spec"], example["spec"])
    app = parse_modelapp(example)
    assert app.spec.image.tag == "1.4" and app.spec.model.credentials.service_account_name == "iris"


# --- size: every field of a ModelApp is tenant input (issue 22) -----------------------------------------------

# Strings whose pattern alone bounds their length (a fixed number of characters, no open repetition).
FIXED_BY_PATTERN = {
    ".spec.image.digest",
    ".spec.model.sha256",
    ".spec.model.credentials.clientId",
    ".spec.rollout.maxSurge",
    ".spec.rollout.maxUnavailable",
}
OPEN_REPETITION = re.compile(r"(?<!\\)[*+]|\{\d+,\}")


def test_every_string_and_list_of_the_spec_is_capped(crd: dict[str, Any]) -> None:
    """A ModelApp's size is bounded. Labels and annotations, which a CRD cannot cap, are the admission policy
    modelapp-metadata-limits' (deploy/base/admission-policies.yaml)."""
    uncapped = []
    for path, node in walk(schema_of(crd)["properties"]["spec"], ".spec"):
        stringy = node.get("type") == "string" or node.get("x-kubernetes-int-or-string")
        fixed = path in FIXED_BY_PATTERN and not OPEN_REPETITION.search(node["pattern"])
        if stringy and "maxLength" not in node and "enum" not in node and not fixed:
            uncapped.append(path)
        if node.get("type") == "array" and "maxItems" not in node:
            uncapped.append(path)
        # No free-form maps: unknown fields are pruned, so there is nothing for maxProperties to cap.
        assert "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"), path
    assert uncapped == []


def test_env_is_capped_in_total_and_the_typed_model_agrees(crd: dict[str, Any]) -> None:
    env = schema_of(crd)["properties"]["spec"]["properties"]["env"]
    (rule,) = env["x-kubernetes-validations"]
    assert f"<= {ENV_MAX_CHARACTERS}" in rule["rule"] and str(ENV_MAX_CHARACTERS) in rule["message"]
    per_variable = env["items"]["properties"]
    # What the caps per variable alone allowed: 64 variables of 4 KiB and more, 64 times the total cap.
    assert env["maxItems"] * (per_variable["name"]["maxLength"] + per_variable["value"]["maxLength"]) > 64 * 4096

    def with_env(*values: str) -> dict[str, Any]:
        return {
            "metadata": {"name": "iris", "namespace": "ml", "uid": "u"},
            "spec": {
                "image": {"repository": "team.azurecr.io/iris", "tag": "1"},
                "model": {
                    "blob": {"accountUrl": "https://a.blob.core.windows.net", "container": "models", "name": "m.onnx"},
                    "credentials": {"serviceAccountName": "iris"},
                },
                "env": [{"name": f"V{i}", "value": value} for i, value in enumerate(values)],
            },
        }

    at_cap = "x" * (ENV_MAX_CHARACTERS - 2)  # with its name V0
    assert parse_modelapp(with_env(at_cap)).spec.env[0].value == at_cap
    with pytest.raises(SpecError, match=f"env: {ENV_MAX_CHARACTERS + 1} characters"):
        parse_modelapp(with_env(at_cap + "x"))
    with pytest.raises(SpecError, match="env: "):
        parse_modelapp(with_env(*["x" * 200] * 30))  # every variable small, the sum too large
