"""The Open Inference Protocol (KServe "V2") REST API for the one model this app serves: pure code, no HTTP.

web.py routes `/v2/...` here (Flask for every answer, the fast paths for a well-formed infer). The rules:
- name: MODELAPP_MODEL_NAME, else the model blob's file name without its extension (`iris/model.onnx` ->
  `model`), made URL-safe; `model` without a blob (tests, tools).
- version: the pinned model version, the ETag as `modelapp status` shows it, without quotes
  (`0x8DC2B6F0D1A2B3C`); `/versions/<v>` takes it with or without quotes. Any other version is unknown (404).
- infer takes exactly the model's one input, by name, 2-D `[rows, features]`; its data flat or nested
  (row-major), JSON numbers checked against the declared datatype (any integer or float datatype, converted
  to the model's input type as /predict converts JSON numbers), then answers the model's one output.
- errors are `{"error": "..."}`: 400 for a request the model cannot take, 404 for another model or version.
- JSON only: the binary tensor data extension is not offered (a request using it gets a 400 saying so);
  `parameters` are accepted and ignored, so `binary_data_output` answers come back as JSON, which every
  client reads.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt

from modelapp_serving import __version__
from modelapp_serving.config import MODEL_NAME_PATTERN, ServingConfig
from modelapp_serving.model import LoadedModel, ModelSignature, TensorMetadata, model_signature
from modelapp_serving.model_blob import normalize_etag, parse_blob_url
from modelapp_serving.state import ModelState

SERVER_NAME = "modelapp"
DEFAULT_MODEL_NAME = "model"
BINARY_HEADER = "Inference-Header-Content-Length"
"""The binary tensor data extension's header (tritonclient with binary_data=True, kserve's raw data)."""

# The protocol's tensor datatypes and numpy's types for them; BYTES holds strings (numpy: object).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    **{name.upper(): np.dtype(name) for name in ("uint8", "uint16", "uint32", "uint64")},
    **{name.upper(): np.dtype(name) for name in ("int8", "int16", "int32", "int64")},
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}
_INTEGER_DATATYPES = frozenset(name for name, dtype in DATATYPES.items() if dtype.kind in "iu")
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
_NUMBER_DATATYPES = _INTEGER_DATATYPES | _FLOAT_DATATYPES
_FLOAT_MAX = {name: float(np.finfo(DATATYPES[name]).max) for name in _FLOAT_DATATYPES}
# The element kinds numpy gives JSON data of each kind of datatype (bools inside numbers are checked apart).
_KINDS_FOR = {
    "BOOL": "b",
    "BYTES": "U",
    **dict.fromkeys(_INTEGER_DATATYPES, "iu"),
    **dict.fromkeys(_FLOAT_DATATYPES, "iuf"),
}
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


class OipError(Exception):
    """A request the protocol answers with an error: `{"error": message}` and `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol's datatype for a numpy dtype: strings (and anything numpy keeps as objects) are BYTES."""
    return _DATATYPE_OF.get(dtype, "BYTES")


def served_model_name(config: ServingConfig) -> str:
    """MODELAPP_MODEL_NAME, else the blob's file name without its extension, else `model` (see the module doc)."""
    if config.model_name:
        return config.model_name
    if config.model is not None:
        stem = PurePosixPath(parse_blob_url(config.model.url).blob).stem
        name = _UNSAFE_NAME_CHARACTERS.sub("-", stem).strip("-._")[:253]
        if MODEL_NAME_PATTERN.fullmatch(name):
            return name
    return DEFAULT_MODEL_NAME


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode()


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": []}


def _tensor_metadata(tensor: TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": datatype_of(tensor.dtype), "shape": list(tensor.shape)}


class OipApi:
    """The protocol's view of this app: the model's name and version (known before it is loaded) and, once
    the model is ready, the ServedModel that answers metadata and infer."""

    def __init__(self, name: str, state: ModelState) -> None:
        self.name = name
        self._state = state
        self._served: ServedModel | None = None

    @property
    def version(self) -> str | None:
        info = self._state.info
        return normalize_etag(info.etag) if info is not None and info.etag else None

    def check_model(self, name: str, version: str | None = None) -> None:
        """Raise a 404 OipError unless `name` (and `version`, when given) is the model served here."""
        if name != self.name:
            raise OipError(f"unknown model {name!r}: this server serves {self.name!r}", 404)
        if version is not None and normalize_etag(version) != self.version:
            known = f"its version is {self.version!r}" if self.version else "it has no version to choose"
            raise OipError(f"unknown version {version!r} of model {name!r}: {known}", 404)

    def served(self) -> ServedModel | None:
        """The ready model as the protocol serves it (built once per loaded model); None until ready."""
        model = self._state.model
        if model is None:
            return None
        served = self._served
        version = self.version
        if served is None or served.model is not model or served.version != version:
            served = self._served = ServedModel.describe(model, self.name, version)
        return served


@dataclass(frozen=True)
class ServedModel:
    """One loaded model, named and versioned, with what the protocol says about it worked out once."""

    model: LoadedModel
    name: str
    version: str | None
    signature: ModelSignature
    input: TensorMetadata
    input_datatype: str
    output_name: str
    output_datatype: str | None
    """None: known only from the answers (a model without a signature)."""
    infer_paths: frozenset[str]
    """The exact (decoded) paths of this model's infer endpoint, for the fast paths' one lookup."""
    response_head: str
    """The answer's JSON up to its outputs: `{"model_name":...,"model_version":...`."""

    @classmethod
    def describe(cls, model: LoadedModel, name: str, version: str | None) -> ServedModel:
        signature = model_signature(model)
        (model_input,) = signature.inputs  # the loaders take models with exactly one input
        output = signature.outputs[0] if signature.outputs else None
        paths = {f"/v2/models/{name}/infer"}
        if version:
            paths |= {f"/v2/models/{name}/versions/{version}/infer", f'/v2/models/{name}/versions/"{version}"/infer'}
        head = {"model_name": name, **({"model_version": version} if version else {})}
        return cls(
            model=model,
            name=name,
            version=version,
            signature=signature,
            input=model_input,
            input_datatype=datatype_of(model_input.dtype),
            output_name=output.name if output is not None else "output",
            output_datatype=datatype_of(output.dtype) if output is not None else None,
            infer_paths=frozenset(paths),
            response_head=_json(head)[:-1],
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version] if self.version else [],
            "platform": self.signature.platform,
            "inputs": [_tensor_metadata(tensor) for tensor in self.signature.inputs],
            "outputs": [_tensor_metadata(tensor) for tensor in self.signature.outputs],
        }

    def infer(self, body: bytes) -> bytes:
        """Answer an inference request body (JSON); raise OipError (400) naming what the model cannot take."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise OipError("the body is not valid JSON") from None
        if type(document) is not dict:
            raise OipError('the body must be a JSON object: {"inputs": [{"name", "shape", "datatype", "data"}]}')
        request_id = document.get("id")
        if request_id is not None and type(request_id) is not str:
            raise OipError('"id" must be a string')
        self._check_requested_outputs(document.get("outputs"))
        features = self._features(document.get("inputs"), body)
        outputs = _json([self._output(self.model.predict(features))])
        request_id_part = "" if request_id is None else f',"id":{_json(request_id)}'
        return f'{self.response_head}{request_id_part},"outputs":{outputs}}}'.encode()

    def _check_requested_outputs(self, requested: Any) -> None:
        if requested is None:
            return
        if type(requested) is not list:
            raise OipError('"outputs" must be a list of {"name": ...} objects')
        for item in requested:
            name = item.get("name") if type(item) is dict else None
            if name != self.output_name:
                raise OipError(f"unknown output {_shown(name)}: this model's output is {self.output_name!r}")

    def _features(self, inputs: Any, body: bytes) -> npt.NDArray[Any]:
        """The one input as a 2-D array of the model's input type."""
        expected = self.input
        if type(inputs) is not list or len(inputs) != 1 or type(inputs[0]) is not dict:
            raise OipError(f'"inputs" must be a list of one tensor: this model takes one input, {expected.name!r}')
        tensor: dict[str, Any] = inputs[0]
        name = tensor.get("name")
        if name != expected.name:
            raise OipError(f"unknown input {_shown(name)}: this model's input is {expected.name!r}")
        parameters = tensor.get("parameters")
        if "data" not in tensor or (type(parameters) is dict and "binary_data_size" in parameters):
            raise OipError(
                f"input {name!r} has no JSON data: this server takes tensors as JSON only "
                "(the binary tensor data extension is not supported; tritonclient: binary_data=False)"
            )
        shape = self._checked_shape(tensor.get("shape"))
        datatype = tensor.get("datatype")
        if type(datatype) is not str or datatype not in _KINDS_FOR:
            raise OipError(
                f"unknown datatype {_shown(datatype)} for input {name!r}: the protocol's are {', '.join(DATATYPES)}"
            )
        model_datatype = self.input_datatype
        takes_numbers = expected.dtype.kind == "f"
        if datatype != model_datatype and not (takes_numbers and datatype in _NUMBER_DATATYPES):
            also = " (or any integer or float datatype, converted to it)" if takes_numbers else ""
            raise OipError(f"input {name!r} takes {model_datatype}{also}, not {datatype}")
        array = _decoded(tensor["data"], datatype, name, body)
        if array.size != math.prod(shape):
            raise OipError(
                f"shape {shape} of input {name!r} holds {math.prod(shape)} values; its data has {array.size}"
            )
        if array.dtype.kind == "f":
            # One check against the narrower range: the declared datatype's or the model's.
            if _FLOAT_MAX[datatype] <= _FLOAT_MAX.get(model_datatype, math.inf):
                _check_finite_within(array, datatype, f"{datatype} data of input {name!r}")
            else:
                _check_finite_within(array, model_datatype, f"input {name!r} ({model_datatype})")
        return array.reshape(shape).astype(expected.dtype, copy=False)

    def _checked_shape(self, shape: Any) -> list[int]:
        expected = self.input
        if type(shape) is not list:
            raise OipError(f'"shape" of input {expected.name!r} must be a list of non-negative integers')
        for size in shape:
            if type(size) is not int or size < 0:
                raise OipError(f'"shape" of input {expected.name!r} must be a list of non-negative integers')
        fits = len(shape) == len(expected.shape)
        for wanted, size in zip(expected.shape, shape, strict=False):
            fits = fits and wanted in (-1, size)
        if not fits:
            raise OipError(
                f"input {expected.name!r} takes shape {list(expected.shape)} (-1: any size), not {_shown(shape)}"
            )
        if 0 in shape:
            raise OipError(f"input {expected.name!r} needs at least one row")
        return shape

    def _output(self, predictions: list[Any]) -> dict[str, Any]:
        result = np.asarray(predictions)
        datatype = self.output_datatype
        found = datatype_of(result.dtype)
        # The model's own declaration names the type (FP32 where the values were widened to Python floats),
        # unless the answers are of another kind altogether.
        if datatype is None or DATATYPES[datatype].kind != DATATYPES[found].kind:
            datatype = found
        data = predictions if result.ndim == 1 else result.ravel().tolist()
        if datatype == "BYTES":
            data = [value.decode(errors="replace") if isinstance(value, bytes) else value for value in data]
        return {"name": self.output_name, "datatype": datatype, "shape": list(result.shape), "data": data}


def _decoded(data: Any, datatype: str, name: str, body: bytes) -> npt.NDArray[Any]:
    """JSON tensor data (flat or nested) as a numpy array, checked against its declared datatype."""
    if type(data) is not list:
        raise OipError(f'"data" of input {name!r} must be a list (flat or nested, row-major)')
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise OipError(f'"data" of input {name!r} is ragged: nested lists must all have the same length') from None
    kinds = _KINDS_FOR[datatype]
    if array.dtype.kind not in kinds:
        what = {"b": "true or false", "U": "strings", "iu": "integers", "iuf": "JSON numbers"}[kinds]
        raise OipError(f"{datatype} data of input {name!r} must be {what}")
    # numpy makes [1, true] numbers and ["a", 1] strings: look at the values themselves where that can hide one.
    if kinds == "U" and not _leaves_are(data, str):
        raise OipError(f"BYTES data of input {name!r} must be strings")
    if kinds != "b" and (b"true" in body or b"false" in body) and not _leaves_are(data, int, float, str):
        raise OipError(f"{datatype} data of input {name!r} must not hold booleans")
    declared = DATATYPES[datatype]
    if declared.kind in "iu" and array.size:
        limits = np.iinfo(declared)
        if int(array.min()) < limits.min or int(array.max()) > limits.max:
            raise OipError(f"{datatype} data of input {name!r} must lie within [{limits.min}, {limits.max}]")
    return array


def _check_finite_within(array: npt.NDArray[Any], datatype: str, what: str) -> None:
    """NaN fails the comparison too (Python's json reads NaN and Infinity, which JSON does not have)."""
    if array.size and not float(np.abs(array).max()) <= _FLOAT_MAX[datatype]:
        raise OipError(f"{what} must be finite numbers within {datatype} range (no NaN or Infinity)")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _leaves_are(data: list[Any], *types: type) -> bool:
    """Whether every value in the nested lists is exactly of one of `types` (a bool is not an int here)."""
    return all(_leaves_are(item, *types) if type(item) is list else type(item) in types for item in data)


def _shown(value: Any) -> str:
    """A client's value in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
