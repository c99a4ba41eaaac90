"""Reshape targets as constants with 0 ("copy this dim") instead of shapes computed at run time.

Why: the tracer writes `t.view(B, S, H, hs)` as Reshape(t, Concat(Shape(a)[0:1], Shape(b)[1:2], H, hs)).
ONNX Runtime's CUDA provider keeps Shape's output in CPU memory and moves every node that reads
only such tensors (the Concat) to the CPU provider (core/framework/fallback_cpu_capability.cc);
the runtime opens CUDA sessions with CPU fallback disabled, so ORT refuses such a graph. A Reshape
whose dim i is copied from a tensor whose dim is the same symbolic dimension as the Reshape
input's dim i is Reshape(t, [.., 0, ..]) with allowzero=0: the same output, no run-time shape.

Sameness is by symbolic dimension name after ONNX shape inference (one name is one value in an
ONNX graph); a part that cannot be proven the same leaves that Reshape as it is, and
graphs/cuda_check.py reports what is left.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .maps import producers


def _dims(model: onnx.ModelProto) -> dict[str, list]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    except Exception:
        inferred = model
    g = inferred.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                            for d in vi.type.tensor_type.shape.dim]
    return out


def _const(g: onnx.GraphProto, prod: dict, name: str) -> np.ndarray | None:
    for init in g.initializer:
        if init.name == name:
            return numpy_helper.to_array(init) if not init.external_data else None
    node = prod.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def _shape_slice(node: onnx.NodeProto | None) -> tuple[str, int] | None:
    """(tensor, axis) for Shape(tensor, start=k, end=k+1), a one-dim slice of a shape."""
    if node is None or node.op_type != "Shape":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    start, end = attrs.get("start"), attrs.get("end")
    if start is None or end is None or end != start + 1 or start < 0:
        return None
    return node.input[0], int(start)


def static_reshapes(model: onnx.ModelProto) -> int:
    """Rewrite provable Reshape(x, Concat(shape slices, constants)) targets in place; returns how many.
    Leaves the now unread Shape/Concat nodes to graphs.optimize.remove_dead."""
    g = model.graph
    prod = producers(g)
    dims = _dims(model)
    done = 0
    for n, node in enumerate(g.node):
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        cat = prod.get(node.input[1])
        xdims = dims.get(node.input[0])
        if cat is None or cat.op_type != "Concat" or xdims is None:
            continue
        target: list[int] = []
        for i, part in enumerate(cat.input):
            value = _const(g, prod, part)
            if value is not None and value.size == 1 and int(value.reshape(-1)[0]) != 0:
                target.append(int(value.reshape(-1)[0]))
                continue
            sl = _shape_slice(prod.get(part))
            src = dims.get(sl[0]) if sl else None
            if sl and src and sl[1] < len(src) and i < len(xdims) and src[sl[1]] is not None \
                    and src[sl[1]] == xdims[i]:
                target.append(0)
                continue
            target = []
            break
        if not target or target.count(-1) > 1:
            continue
        name = f"{node.name or node.output[0]}/static_shape"
        g.initializer.append(numpy_helper.from_array(np.array(target, np.int64), name))
        node.input[1] = name
        for a in list(node.attribute):
            if a.name == "allowzero":
                node.attribute.remove(a)  # 0 means "copy the input's dim" (no constant here is 0)
        done += 1
    return done
