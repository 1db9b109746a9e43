"""A tiny, deterministic sample model (iris LogisticRegression) exported to ONNX and skops.

Everything is offline: the iris data set ships with scikit-learn.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import skops.io
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

N_FEATURES = 4
ONNX_INPUT_NAME = "input"
RANDOM_STATE = 0


@dataclass(frozen=True)
class SampleModelFiles:
    onnx: Path
    skops: Path


def train_iris_classifier(label_shift: int = 0) -> Any:
    """Fit a LogisticRegression on iris; same data and seed give the same coefficients.

    label_shift: train on (label + shift) mod 3, a valid model that answers wrong with every answer it gives
    (the label order permuted): what the release gate must keep out."""
    features, labels = load_iris(return_X_y=True)
    classifier = LogisticRegression(max_iter=500, random_state=RANDOM_STATE)
    classifier.fit(features.astype("float32"), (labels + label_shift) % 3)
    return classifier


def export_onnx(classifier: Any, path: Path) -> Path:
    """Export with a float32 input named `input` of shape [None, 4] and plain tensor outputs (no ZipMap)."""
    # skl2onnx is a dev-only dependency: the serving image never exports models.
    from skl2onnx import to_onnx  # noqa: PLC0415
    from skl2onnx.common.data_types import FloatTensorType  # noqa: PLC0415

    onnx_model = to_onnx(
        classifier,
        initial_types=[(ONNX_INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
        options={id(classifier): {"zipmap": False}},
        target_opset=17,
    )
    path.write_bytes(onnx_model.SerializeToString())
    return path


def export_skops(classifier: Any, path: Path) -> Path:
    skops.io.dump(classifier, path)
    return path


def write_sample_models(directory: Path, stem: str = "iris", *, label_shift: int = 0) -> SampleModelFiles:
    """Train once and write `<stem>.onnx` and `<stem>.skops` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    classifier = train_iris_classifier(label_shift)
    return SampleModelFiles(
        onnx=export_onnx(classifier, directory / f"{stem}.onnx"),
        skops=export_skops(classifier, directory / f"{stem}.skops"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelapp_serving.sample_model",
        description="Train a tiny iris LogisticRegression and export it to ONNX and skops (offline).",
    )
    parser.add_argument("directory", type=Path, help="folder to write <stem>.onnx and <stem>.skops into")
    parser.add_argument("--stem", default="iris", help="file name stem (default: iris)")
    parser.add_argument(
        "--permute-labels",
        action="store_true",
        help="train on shifted labels: a valid model whose every answer is wrong (for the release gate)",
    )
    args = parser.parse_args(argv)
    files = write_sample_models(args.directory, args.stem, label_shift=1 if args.permute_labels else 0)
    print(files.onnx)
    print(files.skops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
