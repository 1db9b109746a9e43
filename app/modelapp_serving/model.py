"""Load a verified model file (ONNX, skops, opt-in pickle) behind one small predict interface."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import onnxruntime

from modelapp_serving.config import ModelFormat
from modelapp_serving.onnx_external_data import NotOnnxProtobuf, find_external_tensors

# Types skops does not trust by default that are plain data; anything else in a skops file is refused.
SKOPS_ALLOWED_EXTRA_TYPES = frozenset(
    {
        "builtins.slice",
        "numpy.dtype",
        "numpy.float32",
        "numpy.float64",
        "numpy.int32",
        "numpy.int64",
        "numpy.bool_",
        "numpy.str_",
        "collections.OrderedDict",
        "sklearn.utils._bunch.Bunch",
    }
)

_FLOAT32 = np.dtype(np.float32)
_ONNX_DTYPES: dict[str, npt.DTypeLike] = {"tensor(float)": np.float32, "tensor(double)": np.float64}
# The element types an ONNX tensor output may have, as numpy dtypes (strings as object: numpy has no
# variable-length string dtype).
_ONNX_TENSOR_DTYPES: dict[str, npt.DTypeLike] = {
    **_ONNX_DTYPES,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
    **{f"tensor({name})": name for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
}
SKLEARN_INPUT_NAME = "input"
"""scikit-learn estimators do not name their input; this is the name the sample model's ONNX export gives it,
so one client serves either format."""


class ModelLoadError(Exception):
    """The file is not a model we can load safely. `reason` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output as the model declares it."""

    name: str
    dtype: np.dtype[Any]
    """Strings are `object`."""
    shape: tuple[int, ...]
    """-1 where the model takes any size (the batch dimension, usually)."""


@dataclass(frozen=True)
class ModelSignature:
    """What the model file says about what it takes and gives: for protocol metadata (e.g. GET /v2/models/m)."""

    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    """The outputs `predict` returns: one."""


class LoadedModel(Protocol):
    """What the web layer needs from a model (/predict needs no more; see DescribedModel for the protocol API)."""

    @property
    def n_features(self) -> int: ...

    @property
    def input_dtype(self) -> np.dtype[Any]: ...

    @property
    def fixed_batch_size(self) -> int | None: ...

    def predict(self, features: npt.NDArray[Any]) -> list[Any]:
        """`features` is 2-D, `input_dtype`, with `n_features` columns; returns one prediction per row."""
        ...


@runtime_checkable
class DescribedModel(LoadedModel, Protocol):
    """A LoadedModel that says what it takes and gives, from the model itself: every model the loaders return."""

    @property
    def signature(self) -> ModelSignature: ...


def model_signature(model: LoadedModel) -> ModelSignature:
    """The model's own signature; for a LoadedModel without one (a test double), what its predict interface
    says: one input, named as the sample model's; its output is known only from its answers (no outputs)."""
    if isinstance(model, DescribedModel):
        return model.signature
    shape = (model.fixed_batch_size or -1, model.n_features)
    model_input = TensorMetadata(SKLEARN_INPUT_NAME, model.input_dtype, shape)
    return ModelSignature(platform="", inputs=(model_input,), outputs=())


@dataclass(frozen=True)
class OnnxModel:
    session: Any
    input_name: str
    output_name: str
    n_features: int
    input_dtype: np.dtype[Any]
    fixed_batch_size: int | None
    signature: ModelSignature

    def predict(self, features: npt.NDArray[Any]) -> list[Any]:
        (outputs,) = self.session.run([self.output_name], {self.input_name: features})
        result: list[Any] = np.asarray(outputs).tolist()
        return result


@dataclass(frozen=True)
class SklearnModel:
    estimator: Any
    n_features: int
    input_dtype: np.dtype[Any] = _FLOAT32
    fixed_batch_size: int | None = None

    def predict(self, features: npt.NDArray[Any]) -> list[Any]:
        if not getattr(_SKLEARN_FAST, "set", False):
            _set_sklearn_fast_config()
        result: list[Any] = np.asarray(self.estimator.predict(features)).tolist()
        return result

    @cached_property
    def signature(self) -> ModelSignature:
        """Input: `n_features_in_` columns of `input_dtype`. Output: a classifier's `classes_` (their dtype; one
        column per output of a multi-output one); any other estimator's answer to one row of zeros (dtype and
        columns: regressors do not all declare `n_outputs_`). Named as skl2onnx names them (`label`,
        `variable`), so the ONNX export of the same model answers alike."""
        classes = getattr(self.estimator, "classes_", None)
        if isinstance(classes, np.ndarray):
            output = TensorMetadata("label", _plain_dtype(classes.dtype), (-1,))
        elif isinstance(classes, list) and classes and all(isinstance(c, np.ndarray) for c in classes):
            output = TensorMetadata("label", _plain_dtype(classes[0].dtype), (-1, len(classes)))  # multi-output
        else:
            output = TensorMetadata("variable", *self._probed_output())
        return ModelSignature(
            platform="scikit-learn",
            inputs=(TensorMetadata(SKLEARN_INPUT_NAME, self.input_dtype, (-1, self.n_features)),),
            outputs=(output,),
        )

    def _probed_output(self) -> tuple[np.dtype[Any], tuple[int, ...]]:
        try:
            answer = np.asarray(self.estimator.predict(np.zeros((1, self.n_features), dtype=self.input_dtype)))
        except Exception:
            outputs = getattr(self.estimator, "n_outputs_", 1)
            many = isinstance(outputs, int | np.integer) and outputs > 1
            return np.dtype(np.float64), ((-1, int(outputs)) if many else (-1,))
        return _plain_dtype(answer.dtype), (-1, *answer.shape[1:])


def _plain_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """numpy's fixed-width unicode and bytes dtypes are strings, as `object` is."""
    return np.dtype(np.object_) if dtype.kind in "USO" else dtype


# /predict has checked that every feature is finite and within float32 range (predict.parse_features), so
# scikit-learn's own finiteness scan and parameter validation repeat work: 186 -> 112 us per one-row
# LogisticRegression.predict here. scikit-learn keeps its config per thread: set once in each serving thread.
_SKLEARN_FAST = threading.local()


def _set_sklearn_fast_config() -> None:
    import sklearn  # noqa: PLC0415 - see import_runtime

    sklearn.set_config(assume_finite=True, skip_parameter_validation=True)
    _SKLEARN_FAST.set = True


def import_runtime(model_format: ModelFormat) -> None:
    """Import what loading `model_format` needs, in the worker before it serves: scikit-learn, scipy and skops
    cost ~5 s of CPU that an ONNX model never needs, so only a skops or pickle model pays it; and paid here,
    not in the loader thread, a second worker still loading does not answer 503 longer than before."""
    if model_format in (ModelFormat.SKOPS, ModelFormat.PICKLE):
        import joblib  # type: ignore[import-untyped]  # noqa: F401, PLC0415
        import sklearn  # noqa: F401, PLC0415
        import skops.io  # noqa: F401, PLC0415


def load_model_file(path: Path, model_format: ModelFormat, *, allow_pickle: bool, onnx_threads: int = 1) -> LoadedModel:
    """Load a file whose sha256 was already verified; raise ModelLoadError with a one-line reason."""
    try:
        if model_format is ModelFormat.ONNX:
            return _load_onnx(path, onnx_threads)
        if model_format is ModelFormat.SKOPS:
            return _sklearn_model(_load_skops(path))
        if model_format is ModelFormat.PICKLE:
            if not allow_pickle:
                raise ModelLoadError("pickle models run code when loaded: set MODELAPP_ALLOW_PICKLE=true to allow")
            import joblib  # noqa: PLC0415 - see import_runtime (its missing stubs are noted there)

            return _sklearn_model(joblib.load(path))
    except ModelLoadError:
        raise
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ModelLoadError(f"cannot load the {model_format.value} model: {first_line}") from None
    raise ModelLoadError(f"unsupported model format {model_format!r}")


def refuse_external_data(path: Path) -> None:
    """Raise ModelLoadError if the ONNX file references data in other files (onnx_external_data says why)."""
    try:
        external = find_external_tensors(path)
    except NotOnnxProtobuf as error:
        raise ModelLoadError(f"cannot load the onnx model: not an ONNX protobuf message ({error})") from None
    if external:
        first = external[0]
        more = f" and {len(external) - 1} more" if len(external) > 1 else ""
        raise ModelLoadError(
            f"the ONNX model references external data (tensor {_shown(first.name)} in file "
            f"{_shown(first.location)}{more}), which could be any file of the pod: save it as one file "
            "(onnx.save_model(..., save_as_external_data=False))"
        )


def _shown(text: str) -> str:
    """A string from the model file in a refusal reason, cut short."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _load_onnx(path: Path, threads: int) -> OnnxModel:
    refuse_external_data(path)  # before onnxruntime opens anything the file names
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"the ONNX model has {len(inputs)} inputs; exactly one 2-D tensor input is supported")
    model_input = inputs[0]
    if model_input.type not in _ONNX_DTYPES:
        raise ModelLoadError(f"the ONNX input {model_input.name!r} is {model_input.type}; float or double needed")
    shape = model_input.shape
    if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1:
        raise ModelLoadError(f"the ONNX input {model_input.name!r} has shape {shape}; [batch, n_features] needed")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    model_output = session.get_outputs()[0]
    input_dtype = np.dtype(_ONNX_DTYPES[model_input.type])
    signature = ModelSignature(
        platform="onnxruntime_onnx",
        inputs=(TensorMetadata(model_input.name, input_dtype, (batch or -1, shape[1])),),
        outputs=(_onnx_tensor_metadata(model_output),),
    )
    return OnnxModel(
        session=session,
        input_name=model_input.name,
        output_name=model_output.name,
        n_features=shape[1],
        input_dtype=input_dtype,
        fixed_batch_size=batch,
        signature=signature,
    )


def _onnx_tensor_metadata(node: Any) -> TensorMetadata:
    """ONNX names a dimension it does not fix with a string or None: -1. A non-tensor output (a ZipMap's
    sequence of maps) has no element type numpy knows: `object`."""
    dtype = np.dtype(_ONNX_TENSOR_DTYPES.get(node.type, np.object_))
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorMetadata(node.name, dtype, shape)


def _load_skops(path: Path) -> Any:
    import skops.io  # noqa: PLC0415 - see import_runtime

    untrusted = skops.io.get_untrusted_types(file=path)
    refused = sorted(set(untrusted) - SKOPS_ALLOWED_EXTRA_TYPES)
    if refused:
        shown = ", ".join(refused[:5]) + (" …" if len(refused) > 5 else "")
        raise ModelLoadError(f"the skops file contains types outside the allow-list: {shown}")
    return skops.io.load(path, trusted=list(untrusted))


def _sklearn_model(estimator: Any) -> SklearnModel:
    if not callable(getattr(estimator, "predict", None)):
        raise ModelLoadError(f"the loaded object ({type(estimator).__name__}) has no predict method")
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int | np.integer) or n_features < 1:
        raise ModelLoadError("the estimator does not declare n_features_in_ (is it fitted?)")
    return SklearnModel(estimator=estimator, n_features=int(n_features))
