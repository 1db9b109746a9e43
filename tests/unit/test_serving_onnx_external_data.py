"""ONNX models that reference external data are refused before onnxruntime reads them, wherever the format puts
the tensor, and the file they name is never opened (an inotify watch on it sees no open)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from modelapp_serving.config import ModelFormat
from modelapp_serving.model import ModelLoadError, load_model_file
from modelapp_serving.onnx_external_data import ExternalTensor, NotOnnxProtobuf, find_external_tensors
from modelapp_serving.sample_model import write_sample_models
from onnx import TensorProto, helper

pytestmark = pytest.mark.unit

TRAVERSAL = "../../proc/self/environ"
IN_OPEN, IN_ACCESS = 0x20, 0x01


def external_tensor(name: str, location: str, *, entries: bool = True, flagged: bool = True) -> TensorProto:
    """A 1x4 float tensor whose bytes the file says are at `location` (no raw data: nothing to write anywhere)."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [1, 4], vals=[0.0] * 4)
    tensor.ClearField("float_data")
    if flagged:
        tensor.data_location = TensorProto.EXTERNAL
    if entries:
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return tensor


def add_graph(
    initializers: list[TensorProto], name: str = "main", nodes: list[onnx.NodeProto] | None = None
) -> onnx.GraphProto:
    """Y = X + W, X a [batch, 4] float input (the shape the loader takes)."""
    return helper.make_graph(
        nodes if nodes is not None else [helper.make_node("Add", ["X", "W"], ["Y"])],
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
        initializers,
    )


def model_of(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def write(model: onnx.ModelProto, path: Path) -> Path:
    # Serialized by hand: onnx.save_model itself writes the raw data of external tensors to their paths.
    path.write_bytes(model.SerializeToString())
    return path


def in_initializer(location: str) -> onnx.ModelProto:
    return model_of(add_graph([external_tensor("W", location)]))


def in_sparse_initializer(location: str) -> onnx.ModelProto:
    values = external_tensor("W_values", location)
    indices = helper.make_tensor("W_indices", TensorProto.INT64, [4], vals=[0, 1, 2, 3])
    graph = add_graph([])
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [1, 4]))
    return model_of(graph)


def in_constant_attribute(location: str) -> onnx.ModelProto:
    constant = helper.make_node("Constant", [], ["W"], value=external_tensor("W", location))
    return model_of(add_graph([], nodes=[constant, helper.make_node("Add", ["X", "W"], ["Y"])]))


def in_attribute_list(location: str) -> onnx.ModelProto:
    node = helper.make_node("Custom", ["X"], ["Y"], domain="example", tensors=[external_tensor("W", location)])
    return model_of(add_graph([], nodes=[node]))


def in_subgraph(location: str) -> onnx.ModelProto:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["Z"])],
        "branch",
        [],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, 4])],
        [external_tensor("W", location)],
    )
    inner = helper.make_node("If", ["C"], ["Y"], then_branch=branch, else_branch=branch)
    # The If sits two subgraphs deep: a Loop body holding it.
    loop_body = helper.make_graph([inner], "body", [], [])
    loop = helper.make_node("Loop", ["M", "C"], ["Y"], body=loop_body)
    return model_of(add_graph([], nodes=[loop]))


def in_function(location: str) -> onnx.ModelProto:
    constant = helper.make_node("Constant", [], ["W"], value=external_tensor("W", location))
    function = helper.make_function("example", "AddW", ["X"], ["Y"], [constant], [helper.make_opsetid("", 17)])
    model = model_of(add_graph([], nodes=[helper.make_node("AddW", ["X"], ["Y"], domain="example")]))
    model.functions.append(function)
    return model


def in_training_graph(location: str) -> onnx.ModelProto:
    model = in_initializer_free()
    training = model.training_info.add()
    training.initialization.CopyFrom(add_graph([external_tensor("W", location)], name="init"))
    return model


def in_initializer_free() -> onnx.ModelProto:
    return model_of(add_graph([helper.make_tensor("W", TensorProto.FLOAT, [1, 4], vals=[0.0] * 4)]))


PLACES: dict[str, Callable[[str], onnx.ModelProto]] = {
    "graph initializer": in_initializer,
    "sparse initializer": in_sparse_initializer,
    "Constant node attribute": in_constant_attribute,
    "attribute tensor list": in_attribute_list,
    "If branch inside a Loop body": in_subgraph,
    "model-local function": in_function,
    "training initialization graph": in_training_graph,
}


@contextmanager
def opened_watch(path: Path) -> Iterator[Callable[[], bool]]:
    """An inotify watch on `path`; the callable says whether anything opened or read it since the watch began."""
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert descriptor >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.inotify_add_watch(descriptor, os.fsencode(path), IN_OPEN | IN_ACCESS) >= 0

        def touched() -> bool:
            try:
                return len(os.read(descriptor, 4096)) > 0
            except BlockingIOError:
                return False

        yield touched
    finally:
        os.close(descriptor)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model cache folder with a file beside the model that an external reference could name."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00" * 64)
    return folder


def test_the_watch_sees_onnxruntime_open_an_external_file(model_dir: Path) -> None:
    """The control: without the check, onnxruntime does open (and read) the file an initializer names."""
    path = write(in_initializer("weights.bin"), model_dir / "model.onnx")
    with opened_watch(model_dir / "weights.bin") as touched:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.run(None, {"X": np.ones((1, 4), np.float32)})[0].tolist() == [[1.0] * 4]
        assert touched()


@pytest.mark.parametrize("place", PLACES)
def test_external_data_is_refused_before_anything_opens_it(model_dir: Path, place: str) -> None:
    path = write(PLACES[place]("weights.bin"), model_dir / "model.onnx")
    with opened_watch(model_dir / "weights.bin") as touched:
        refused = r"references external data \(tensor 'W[a-z_]*' in file 'weights.bin'( and 1 more)?\)"
        with pytest.raises(ModelLoadError, match=refused):
            load_model_file(path, ModelFormat.ONNX, allow_pickle=False)
        assert not touched()


def test_a_path_out_of_the_model_folder_is_named_in_the_refusal(model_dir: Path) -> None:
    path = write(in_initializer(TRAVERSAL), model_dir / "model.onnx")
    with pytest.raises(ModelLoadError) as refused:
        load_model_file(path, ModelFormat.ONNX, allow_pickle=False)
    assert f"in file {TRAVERSAL!r}" in refused.value.reason
    assert "save_as_external_data=False" in refused.value.reason


@pytest.mark.parametrize(
    ("entries", "flagged"), [(True, False), (False, True)], ids=["entries without the flag", "flag without entries"]
)
def test_either_half_of_an_external_reference_is_refused(model_dir: Path, entries: bool, flagged: bool) -> None:
    model = model_of(add_graph([external_tensor("W", TRAVERSAL, entries=entries, flagged=flagged)]))
    assert find_external_tensors(write(model, model_dir / "model.onnx")) == [
        ExternalTensor("W", TRAVERSAL if entries else "")
    ]


def test_every_external_tensor_is_found_and_the_reason_counts_them(model_dir: Path) -> None:
    model = model_of(add_graph([external_tensor(name, f"{name}.bin") for name in ("W", "V", "U")]))
    path = write(model, model_dir / "model.onnx")
    assert [tensor.name for tensor in find_external_tensors(path)] == ["W", "V", "U"]
    with pytest.raises(ModelLoadError, match="and 2 more"):
        load_model_file(path, ModelFormat.ONNX, allow_pickle=False)


def test_models_with_their_data_inside_load_as_before(tmp_path: Path) -> None:
    write_sample_models(tmp_path)  # scikit-learn's iris classifier exported by skl2onnx
    assert find_external_tensors(tmp_path / "iris.onnx") == []
    assert load_model_file(tmp_path / "iris.onnx", ModelFormat.ONNX, allow_pickle=False).n_features == 4
    inline = write(in_initializer_free(), tmp_path / "inline.onnx")
    assert load_model_file(inline, ModelFormat.ONNX, allow_pickle=False).predict(np.ones((1, 4), np.float32)) == [
        [1.0] * 4
    ]


def _length_delimited(field: int, payload: bytes) -> bytes:
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    return varint(field << 3 | 2) + varint(len(payload)) + payload


def test_subgraphs_nested_deeper_than_the_recursion_limit_are_read(tmp_path: Path) -> None:
    """No recursion: 5,000 subgraphs deep (Node.attribute.g) is read like any other file."""
    graph = _length_delimited(5, external_tensor("W", "deep.bin").SerializeToString())  # graph.initializer
    for _ in range(5_000):
        node = _length_delimited(5, _length_delimited(6, graph))  # node.attribute(g=graph)
        graph = _length_delimited(1, node)  # graph.node
    path = tmp_path / "deep.onnx"
    path.write_bytes(_length_delimited(7, graph))  # model.graph
    assert find_external_tensors(path) == [ExternalTensor("W", "deep.bin")]


@pytest.mark.parametrize(
    "content",
    [b"\x3a\x05\x0a", b"\x3a\x80", b"\x3b", b"\x38\x01"],
    ids=["graph cut short", "truncated length", "group wire type", "graph as a varint"],
)
def test_a_file_that_is_not_protobuf_is_refused_as_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(NotOnnxProtobuf):
        find_external_tensors(path)
    with pytest.raises(ModelLoadError, match="cannot load the onnx model: not an ONNX protobuf message"):
        load_model_file(path, ModelFormat.ONNX, allow_pickle=False)
