"""The /predict request body: parse, check against the model's input signature, answer.

Accepted bodies (JSON, Content-Type application/json):
- `{"instances": [[f1, f2, ...], ...]}`: a batch, one row per instance (also KServe's V1 protocol);
- `{"instance": [f1, f2, ...]}`: a single instance.
Each row has exactly the model's number of features, all JSON numbers (no booleans, strings or null),
finite and within float32 range. The answer is `{"predictions": [...]}`, one per row, for both shapes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt

from modelapp_serving.model import LoadedModel

FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMERIC_KINDS = frozenset("iuf")
_BODY_KEYS = frozenset({"instances", "instance"})


class BadInput(ValueError):
    """The request body does not match what the model takes; the message says why (for a 400)."""


def parse_features(body: bytes, model: LoadedModel) -> npt.NDArray[Any]:
    """Return a 2-D array of the model's dtype, or raise BadInput naming the problem."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise BadInput("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise BadInput('the body must be a JSON object: {"instances": [[...], ...]} or {"instance": [...]}')
    keys = document.keys()
    if len(keys) != 1 or not keys <= _BODY_KEYS:
        unexpected = sorted(keys - _BODY_KEYS)
        if unexpected:
            raise BadInput(f'unexpected key(s) {", ".join(map(repr, unexpected))}: use "instances" or "instance"')
        raise BadInput('give exactly one of "instances" (a batch) or "instance" (one row)')
    batch = "instances" in document
    rows = document["instances"] if batch else document["instance"]
    if not isinstance(rows, list) or not rows:
        shape = "a non-empty list of rows" if batch else "a non-empty list of numbers"
        raise BadInput(f'"{"instances" if batch else "instance"}" must be {shape}')
    try:
        array = np.array(rows)
    except (ValueError, TypeError, OverflowError):
        raise BadInput("the rows are ragged or not numbers: every row needs the same number of numbers") from None
    expected_ndim = 2 if batch else 1
    if array.dtype.kind not in _NUMERIC_KINDS or array.ndim != expected_ndim:
        if array.ndim != expected_ndim and array.dtype.kind in _NUMERIC_KINDS:
            want = "a list of rows (lists of numbers)" if batch else "a flat list of numbers"
            raise BadInput(f'"{"instances" if batch else "instance"}" must be {want}')
        raise BadInput("features must be JSON numbers (no strings, booleans, null or nested lists)")
    # Mixed lists like [1, true] become numbers in numpy; the body has no other place a literal could be.
    if b"true" in body or b"false" in body:
        raise BadInput("features must be JSON numbers, not booleans")
    if array.dtype.kind == "f" and not bool(np.all(np.abs(array) <= FLOAT32_MAX)):
        raise BadInput("features must be finite numbers within float32 range (no NaN or Infinity)")
    if not batch:
        array = array.reshape(1, -1)
    if array.shape[1] != model.n_features:
        raise BadInput(f"each instance needs {model.n_features} features, got {array.shape[1]}")
    if model.fixed_batch_size is not None and array.shape[0] != model.fixed_batch_size:
        raise BadInput(f"this model takes batches of exactly {model.fixed_batch_size} instances")
    return array.astype(model.input_dtype, copy=False)


def predictions_body(predictions: list[Any]) -> bytes:
    return json.dumps({"predictions": predictions}, separators=(",", ":")).encode()
