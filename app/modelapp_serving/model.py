"""Load a verified model file (ONNX, skops, opt-in pickle) behind one small predict interface."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import joblib  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import onnxruntime
import sklearn
import skops.io

from modelapp_serving.config import ModelFormat

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


class ModelLoadError(Exception):
    """The file is not a model we can load safely. `reason` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LoadedModel(Protocol):
    """What the web layer needs from a model."""

    @property
    def n_features(self) -> int: ...

    @property
    def input_dtype(self) -> np.dtype[Any]: ...

    @property
    def fixed_batch_size(self) -> int | None: ...

    def predict(self, features: npt.NDArray[Any]) -> list[Any]:
        """`features` is 2-D, `input_dtype`, with `n_features` columns; returns one prediction per row."""
        ...


@dataclass(frozen=True)
class OnnxModel:
    session: Any
    input_name: str
    output_name: str
    n_features: int
    input_dtype: np.dtype[Any]
    fixed_batch_size: int | None

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


# /predict has checked that every feature is finite and within float32 range (predict.parse_features), so
# scikit-learn's own finiteness scan and parameter validation repeat work: 186 -> 112 us per one-row
# LogisticRegression.predict here. scikit-learn keeps its config per thread: set once in each serving thread.
_SKLEARN_FAST = threading.local()


def _set_sklearn_fast_config() -> None:
    sklearn.set_config(assume_finite=True, skip_parameter_validation=True)
    _SKLEARN_FAST.set = True


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
            return _sklearn_model(joblib.load(path))
    except ModelLoadError:
        raise
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ModelLoadError(f"cannot load the {model_format.value} model: {first_line}") from None
    raise ModelLoadError(f"unsupported model format {model_format!r}")


def _load_onnx(path: Path, threads: int) -> OnnxModel:
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
    return OnnxModel(
        session=session,
        input_name=model_input.name,
        output_name=session.get_outputs()[0].name,
        n_features=shape[1],
        input_dtype=np.dtype(_ONNX_DTYPES[model_input.type]),
        fixed_batch_size=batch,
    )


def _load_skops(path: Path) -> Any:
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
