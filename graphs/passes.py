"""Graph passes on the traced body, in onnx-ir (the protobuf passes on the saved graph are in optimize.py).

Constant folding and dead-code removal come from onnxscript's optimizer; then every node gets a
name that says where it comes from (`/model/layers.3/attn/q_proj/MatMul`), read from the module
path the dynamo exporter records in each node's `namespace` metadata, and every weight gets the
name of the parameter it holds.
"""
from __future__ import annotations

import re
from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

_MODULE = re.compile(r"([A-Za-z_][\w.]*): [\w.]+$")


def optimize(model: ir.Model) -> ir.Model:
    """Fold constants and drop dead code; leaves weight tensors alone (no large-tensor folding)."""
    onnxscript.optimizer.optimize(model, num_iterations=2, input_size_limit=1024, output_size_limit=1024 * 1024)
    for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
        p(model)
    return model


def module_path(namespace: str) -> str:
    """': W/model: TableFreeLM/model.layers.0: Block/model.layers.0.attn.q_proj: Linear/linear: aten...'
    -> 'model/layers.0/attn/q_proj' (the innermost module; '' when the node is outside any)."""
    parts = [p.strip() for p in namespace.split("/")]
    path = ""
    for part in parts[:-1]:  # the last part is the aten op
        m = _MODULE.match(part)
        if m and "." in m.group(1) or (m and m.group(1) == "model"):
            path = m.group(1)
    if not path:
        return ""
    segs = path.split(".")
    out: list[str] = []
    for s in segs:
        if s.isdigit() and out:
            out[-1] = f"{out[-1]}.{s}"
        else:
            out.append(s)
    return "/".join(out)


def name_nodes(model: ir.Model) -> None:
    """Readable, unique node names: /<module path>/<OpType>[_n]."""
    seen: Counter[str] = Counter()
    for node in model.graph:
        path = _node_path(node)
        base = f"/{path}/{node.op_type}" if path else f"/{node.op_type}"
        n = seen[base]
        seen[base] += 1
        node.name = base if n == 0 else f"{base}_{n}"


def _node_path(node: ir.Node) -> str:
    """The node's module path; nodes the optimizer created inherit it from their first consumer."""
    ns = node.metadata_props.get("namespace", "")
    if ns:
        return module_path(ns)
    for out in node.outputs:
        for use in out.uses():
            ns = use.node.metadata_props.get("namespace", "")
            if ns:
                return module_path(ns)
    return ""


def name_weights(model: ir.Model) -> None:
    """Give each large initializer the parameter name it came from (weight_t = stored [in, out])."""
    taken = set(model.graph.initializers)
    for name, value in list(model.graph.initializers.items()):
        if not name.startswith("val_") or value.const_value is None or value.const_value.size < 64:
            continue
        users = value.uses()
        if not users:
            continue
        node = users[0].node
        path = module_path(node.metadata_props.get("namespace", ""))
        if not path:
            continue
        new = path.replace("/", ".") + ".weight_t" if node.op_type == "MatMul" else path.replace("/", ".") + "." + name
        if new in taken:
            continue
        taken.discard(name)
        taken.add(new)
        value.name = new
