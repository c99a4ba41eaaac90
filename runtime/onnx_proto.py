"""Just enough of the protobuf wire format to read initializer shapes and graph input types from
an .onnx file.

Why: config.json's context length must agree with the rotary tables baked into model.kv.onnx
(GroupQueryAttention's cos_cache [max_positions, rotary_dim / 2]); ORT reports that only when a
generation passes the table's end, and onnxruntime does not expose initializers of a session.
The runtime must not need the `onnx` package, and a graph file is small (weights live in the data
file), so this walks ModelProto.graph's nodes and initializers and skips everything else by length.
The same walk reads a graph input's element type (`graph_input_type`): `load` picks the kv graph on
CUDA only when its cache is float16, and must know that before it opens a session.
"""
from __future__ import annotations

from pathlib import Path

# field numbers from onnx.proto3
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT = 1, 5, 11
_VALUE_NAME, _VALUE_TYPE = 1, 2  # ValueInfoProto
_TYPE_TENSOR, _TENSOR_ELEM_TYPE = 1, 1  # TypeProto.tensor_type, TypeProto.Tensor.elem_type
FLOAT, FLOAT16 = 1, 10  # TensorProto.DataType
_NODE_INPUT, _NODE_OP_TYPE = 1, 4
_TENSOR_DIMS, _TENSOR_NAME = 1, 8


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ProtoError("truncated varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """(field number, wire type, value) for each field; LEN values as (start, end) offsets."""
    i, end = start, len(buf) if end is None else end
    while i < end:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            value, i = _varint(buf, i)
        elif wt == 1:
            value, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            value, i = (i, i + n), i + n
        elif wt == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ProtoError(f"unsupported wire type {wt}")
        if i > end:
            raise ProtoError("field runs past the end of its message")
        yield num, wt, value


def _str(buf: bytes, span: tuple[int, int]) -> str:
    return buf[span[0]:span[1]].decode("utf-8", "replace")


def _dims(buf: bytes, span: tuple[int, int]) -> tuple[str, list[int]]:
    name, dims = "", []
    for num, wt, value in _fields(buf, *span):
        if num == _TENSOR_NAME and wt == 2:
            name = _str(buf, value)
        elif num == _TENSOR_DIMS and wt == 0:
            dims.append(value)
        elif num == _TENSOR_DIMS and wt == 2:  # packed
            i, stop = value
            while i < stop:
                d, i = _varint(buf, i)
                dims.append(d)
    return name, dims


def node_input_shapes(path: Path, op_type: str, index: int) -> list[list[int]]:
    """Shapes of the initializers that feed input `index` of every `op_type` node of the main graph."""
    buf = path.read_bytes()
    graph = next((v for n, wt, v in _fields(buf) if n == _MODEL_GRAPH and wt == 2), None)
    if graph is None:
        raise ProtoError("no graph")
    wanted: set[str] = set()
    inits: dict[str, list[int]] = {}
    for num, wt, value in _fields(buf, *graph):
        if wt != 2:
            continue
        if num == _GRAPH_NODE:
            inputs, op = [], ""
            for n, w, v in _fields(buf, *value):
                if n == _NODE_INPUT and w == 2:
                    inputs.append(_str(buf, v))
                elif n == _NODE_OP_TYPE and w == 2:
                    op = _str(buf, v)
            if op == op_type and len(inputs) > index and inputs[index]:
                wanted.add(inputs[index])
        elif num == _GRAPH_INITIALIZER:
            name, dims = _dims(buf, value)
            inits[name] = dims
    return [inits[n] for n in sorted(wanted) if n in inits]


def graph_input_type(path: Path, name: str) -> int | None:
    """The element type (onnx TensorProto.DataType: 1 float, 10 float16) of graph input `name`;
    None when the graph has no such input or it is not a tensor."""
    buf = path.read_bytes()
    graph = next((v for n, wt, v in _fields(buf) if n == _MODEL_GRAPH and wt == 2), None)
    if graph is None:
        raise ProtoError("no graph")
    for num, wt, value in _fields(buf, *graph):
        if num != _GRAPH_INPUT or wt != 2:
            continue
        fields = {n: v for n, w, v in _fields(buf, *value) if w == 2}
        if _VALUE_NAME not in fields or _str(buf, fields[_VALUE_NAME]) != name:
            continue
        tensor = next((v for n, w, v in _fields(buf, *fields[_VALUE_TYPE]) if n == _TYPE_TENSOR and w == 2), None) \
            if _VALUE_TYPE in fields else None
        if tensor is None:
            return None
        return next((v for n, w, v in _fields(buf, *tensor) if n == _TENSOR_ELEM_TYPE and w == 0), None)
    return None
