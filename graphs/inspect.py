"""Small read-only views of an ONNX graph for tests and the exporter's report.

Everything here reads shapes and types only, so it works on a model loaded with
`load_external_data=False` (a 2 GB model costs a few MB to inspect).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """op type (with its domain when not the default one) -> count, most frequent first."""
    c = Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node)
    return dict(c.most_common())


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its dims and type, whether stored inline or externally."""
    numel = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (numel + 1) // 2
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return numel * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def initializer_bytes(model: onnx.ModelProto, by_type: bool = False) -> int | dict[str, int]:
    """Total initializer bytes, or bytes per element type name (e.g. {'FLOAT': ..., 'UINT8': ...})."""
    if not by_type:
        return sum(tensor_bytes(t) for t in model.graph.initializer)
    out: Counter[str] = Counter()
    for t in model.graph.initializer:
        out[TensorProto.DataType.Name(t.data_type)] += tensor_bytes(t)
    return dict(out)


def nodes_with_ops(model: onnx.ModelProto, ops: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes whose op type is in `ops` (e.g. the bitwise ops that CUDA lacks)."""
    wanted = set(ops)
    return [n for n in model.graph.node if n.op_type in wanted]


def float_types_of(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str]:
    """Element type name of graph inputs/outputs/value_info by tensor name (after shape inference)."""
    wanted = set(names)
    out = {}
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if vi.name in wanted:
            out[vi.name] = TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
    return out


__all__ = ["op_histogram", "tensor_bytes", "initializer_bytes", "nodes_with_ops", "float_types_of"]
