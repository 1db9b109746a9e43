"""KServe peer for the serving benchmark: kserve's own ModelServer serving a joblib scikit-learn model, or the
same estimator's ONNX file through onnxruntime (`--model_file iris.onnx`), on its V1 (`:predict`) and V2
(`/v2/models/<name>/infer`) endpoints at once.

Runs inside the kserve virtualenv that `bench/serving_rps.py` builds from `requirements-kserve.txt`,
never in the project venv. It mirrors what KServe's sklearn server does (a `kserve.Model` whose
`predict` calls the estimator on the V1 `instances`, or on a V2 request's first input through kserve's own
`get_predict_input` / `get_predict_response`), but loads the local file itself because kserve 0.21 no longer
ships `kserve.storage`.

    python bench/serving/kserve_server.py --model_file iris.joblib --http_port 8080 --workers 2 \
        --enable_grpc false --enable_latency_logging false
    python bench/serving/kserve_server.py --model_file iris.onnx ...   # the ONNX peer

The ONNX model is a plain `kserve.Model` around an onnxruntime InferenceSession with the session options
ModelApp uses (modelapp_serving.model._load_onnx: 1 intra-op thread, 1 inter-op thread, CPU provider), so
both sides run the same runtime on the same file.
"""

# The kserve venv, not the project venv, has kserve; mypy checks this file without it.
# mypy: disallow-subclassing-any=False

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

# kserve 0.21 with fastapi 0.165 warns on every request; keep the log (and the benchmark) quiet. At module
# level because kserve's worker processes are spawned and re-import this module before serving.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")

import joblib  # type: ignore[import-untyped]  # noqa: E402
import kserve  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # type: ignore[import-untyped,unused-ignore]  # noqa: E402
from kserve.model_server import parser as kserve_parser  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: E402
from kserve.protocol.rest import server as rest_server  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: E402
from kserve.utils.utils import get_predict_input, get_predict_response  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: E402

LOOPBACK = "127.0.0.1"


class SKLearnJoblibModel(kserve.Model):  # type: ignore[misc,unused-ignore]
    """V1 `{"instances": [[...], ...]}` in, `{"predictions": [...]}` out, like KServe's sklearn server; a V2
    request (an InferRequest) answered as that server answers it.

    Module level (not local to main) because kserve pickles the model registry into spawned workers.
    """

    def __init__(self, name: str, model_file: Path) -> None:
        super().__init__(name)
        self.model_file = model_file
        self.estimator: Any = None

    def load(self) -> bool:
        self.estimator = joblib.load(self.model_file)
        self.ready = True
        return True

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, dict):
            instances = np.asarray(payload["instances"], dtype=np.float64)
            return {"predictions": self.estimator.predict(instances).tolist()}
        return get_predict_response(payload, self.estimator.predict(get_predict_input(payload)), self.name)


class OnnxModel(kserve.Model):  # type: ignore[misc,unused-ignore]
    """V1 `{"instances": [[...], ...]}` in, `{"predictions": [...]}` out, through onnxruntime; V2 as above."""

    def __init__(self, name: str, model_file: Path) -> None:
        super().__init__(name)
        self.model_file = model_file
        self.session: Any = None
        self.input_name = ""
        self.output_name = ""
        self.input_dtype: Any = np.float32

    def load(self) -> bool:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(self.model_file), sess_options=options, providers=["CPUExecutionProvider"]
        )
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_dtype = np.float64 if model_input.type == "tensor(double)" else np.float32
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True
        return True

    # kserve pickles the models into its spawned workers; an InferenceSession cannot be pickled: each
    # worker opens its own session from the file (as each ModelApp worker does).
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["session"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.ready:
            self.load()

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, dict):
            instances = np.asarray(payload["instances"], dtype=self.input_dtype)
            (outputs,) = self.session.run([self.output_name], {self.input_name: instances})
            return {"predictions": np.asarray(outputs).tolist()}
        instances = np.asarray(get_predict_input(payload), dtype=self.input_dtype)
        (outputs,) = self.session.run([self.output_name], {self.input_name: instances})
        return get_predict_response(payload, np.asarray(outputs), self.name)


def force_loopback_bind() -> None:
    """kserve hard-codes host 0.0.0.0 in its uvicorn config; the benchmark must stay on loopback.

    The multi-worker server binds the socket in the parent from this config and hands it to spawned
    children (which unpickle it, not re-run __init__), so patching right after construction covers both
    the 1- and N-worker paths.
    """
    original_init = rest_server.RESTServer.__init__

    def init_on_loopback(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.config.host = LOOPBACK

    rest_server.RESTServer.__init__ = init_on_loopback


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve_parser])
    parser.add_argument("--model_file", type=Path, required=True, help="joblib file of the estimator, or .onnx")
    args, _ = parser.parse_known_args()
    force_loopback_bind()
    model_class = OnnxModel if args.model_file.suffix == ".onnx" else SKLearnJoblibModel
    model = model_class(args.model_name, args.model_file)
    model.load()
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
