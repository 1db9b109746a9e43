"""Find the tensors of an ONNX file that keep their data in other files, before onnxruntime opens any.

An ONNX tensor may say "my bytes are in that file" (`data_location: EXTERNAL` and `external_data` entries naming
a path); the runtime then opens the path relative to the model's folder. A model served here is one verified file
and never needs another, while a path such as `../../proc/self/environ` or the service account token's would
make the runtime read the pod's own files into the model (path traversal there is a recurring bug class in ONNX
tooling: onnx#3991, CVE-2025-51480). So the loader refuses any such tensor, wherever the format allows one: the
graph's initializers and sparse initializers, node attributes (tensors, sparse tensors and subgraphs, at any
depth), functions and training graphs.

This reads the protobuf wire format itself, only the messages that can hold a tensor: the `onnx` package, which
would parse the whole model into Python objects, is not in the app image (onnxruntime does not need it), and the
file is memory-mapped, so a large model's weights are skipped by their length, never copied. Every message is
visited with an explicit stack, so no nesting of subgraphs can exhaust the interpreter's recursion limit.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The messages of onnx.proto that can hold a TensorProto, and their fields that do: field number -> message.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _TRAINING, _SPARSE, _TENSOR = range(8)
_FIELDS: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto
    _NODE: {5: _ATTRIBUTE},  # attribute
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t, g, tensors, ...
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # StringStringEntryProto
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class NotOnnxProtobuf(ValueError):
    """The file is not a well-formed protobuf message (so not an ONNX model either)."""


@dataclass(frozen=True)
class ExternalTensor:
    """A tensor whose data the file says is elsewhere: its name and the path it names (either may be empty)."""

    name: str
    location: str


def find_external_tensors(path: Path) -> list[ExternalTensor]:
    """Every tensor in the ONNX file at `path` that references external data, in file order; reads nothing else.
    Raises NotOnnxProtobuf for a file that is not a well-formed protobuf message."""
    with path.open("rb") as file:
        if file.seek(0, 2) == 0:
            return []
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            return _walk(view)


def _walk(data: memoryview) -> list[ExternalTensor]:
    found: list[ExternalTensor] = []
    pending = [(_MODEL, 0, len(data))]
    while pending:
        message, start, end = pending.pop()
        children = _FIELDS[message]
        for field, wire_type, value_start, value_end in _fields(data, start, end):
            child = children.get(field)
            if child is None:
                continue
            if wire_type != _LENGTH_DELIMITED:
                raise NotOnnxProtobuf(f"field {field} holds a message but has wire type {wire_type}")
            if child == _TENSOR:
                external = _external_tensor(data, value_start, value_end)
                if external is not None:
                    found.append(external)
            else:
                pending.append((child, value_start, value_end))
    return found


def _external_tensor(data: memoryview, start: int, end: int) -> ExternalTensor | None:
    """The tensor at data[start:end] if it references external data: `data_location` other than DEFAULT (0), or
    any `external_data` entry (onnxruntime reads only the former; the latter is refused too, being of no use)."""
    name, location, external = "", "", False
    for field, wire_type, value_start, value_end in _fields(data, start, end):
        if field == _TENSOR_NAME and wire_type == _LENGTH_DELIMITED:
            name = _text(data, value_start, value_end)
        elif field == _TENSOR_DATA_LOCATION and wire_type == _VARINT:
            external = _varint(data, value_start)[0] != 0  # the last one counts, as protobuf reads it
        elif field == _TENSOR_EXTERNAL_DATA and wire_type == _LENGTH_DELIMITED:
            external = True
            entry = dict(
                (key, _text(data, value_start_, value_end_))
                for key, _, value_start_, value_end_ in _fields(data, value_start, value_end)
            )
            if entry.get(_ENTRY_KEY) == "location":
                location = entry.get(_ENTRY_VALUE, "")
    return ExternalTensor(name, location) if external else None


def _fields(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field of the message at data[start:end]."""
    position = start
    while position < end:
        key, position = _varint(data, position, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise NotOnnxProtobuf(f"field number 0 at byte {position}")
        value_start = position
        if wire_type == _VARINT:
            position = _varint(data, position, end)[1]
        elif wire_type == _FIXED64:
            position += 8
        elif wire_type == _FIXED32:
            position += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, value_start = _varint(data, position, end)
            position = value_start + length
        else:  # groups (3, 4) are proto2's deprecated encoding, which ONNX never writes; 6 and 7 do not exist
            raise NotOnnxProtobuf(f"wire type {wire_type} at byte {position}")
        if position > end:
            raise NotOnnxProtobuf(f"field {field} runs past the end of its message (byte {end})")
        yield field, wire_type, value_start, position


def _varint(data: memoryview, position: int, end: int | None = None) -> tuple[int, int]:
    limit = len(data) if end is None else end
    if position < limit and data[position] < 0x80:  # one byte: most keys and lengths
        return data[position], position + 1
    value, shift = 0, 0
    while position < limit and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise NotOnnxProtobuf(f"a truncated or overlong varint before byte {position}")


def _text(data: memoryview, start: int, end: int) -> str:
    return bytes(data[start:end]).decode(errors="replace")
