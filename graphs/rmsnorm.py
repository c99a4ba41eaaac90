"""RMSNorm as one ONNX Runtime node: the traced decomposition becomes `SimplifiedLayerNormalization`.

Why: the tracer writes `x * rsqrt(mean(x^2) + eps) * w` as Pow, ReduceMean, Add, Sqrt, Reciprocal,
Mul, Mul (7 nodes a norm). The passes after the trace look for one norm node in front of the head
(graphs/optimize.add_logits_to_keep), decode of small models is bound by per-node overhead (see
fuse_rotary), and onnxruntime-genai's own model builder writes RMSNorm as this op. The op is an
ONNX Runtime contrib op in the default domain (ORT's contrib_defs: SimplifiedLayerNormalization,
since 1; attributes axis, epsilon, stash_type), with CPU and CUDA kernels (graphs/cuda_kernels.json);
ONNX's opset-23 `RMSNormalization` would need the whole graph at opset 23 (DEFAULT_OPSET is 21).

ONNX's own checker does not know the op (it is not in ONNX, yet it sits in ONNX's domain), so
`check_model_file` runs the checker with those nodes shown to it as a custom domain's, which it
skips as it skips com.microsoft RotaryEmbedding; ONNX Runtime checks them when the gate loads the graph.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .maps import consumers
from .optimize import remove_dead

FUSED_OP = "SimplifiedLayerNormalization"
# ORT contrib ops registered in ONNX's default domain, which onnx.checker would refuse as unknown
ORT_DEFAULT_DOMAIN_OPS = (FUSED_OP,)


def _const(name: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The value of a small in-file initializer (None for a computed tensor or external weights)."""
    t = inits.get(name)
    if t is None or t.data_location == TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(t)


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input node that is not `name` (None when neither or both are)."""
    ins = list(node.input)
    if len(ins) != 2 or ins.count(name) != 1:
        return None
    return ins[1 - ins.index(name)]


def _scalar(name: str | None, inits: dict[str, onnx.TensorProto]) -> float | None:
    a = _const(name, inits) if name else None
    return float(a.reshape(())) if a is not None and a.size == 1 else None


def _last_axis_mean(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], rank: int | None) -> bool:
    """ReduceMean over the last axis only, keeping it (axes as input from opset 18, as attribute before)."""
    keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1:
        a = _const(node.input[1], inits)
        axes = None if a is None else [int(v) for v in a.reshape(-1)]
    if keep != 1 or axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _one_reader(name: str, users: dict[str, list[onnx.NodeProto]], op: str) -> onnx.NodeProto | None:
    readers = users.get(name, [])
    return readers[0] if len(readers) == 1 and readers[0].op_type == op else None


def _match(pow_node: onnx.NodeProto, users, inits, hidden: int | None):
    """From a Pow(x, 2): (x, eps, [(weight Mul, weight)], the statistics nodes) or None.

    The normalized x may feed several weight Muls: the tracer's optimizer merges the identical
    statistics of two norms that read the same x (the GPT-NeoX parallel block's ln1 and ln2).
    """
    x = pow_node.input[0]
    if _scalar(pow_node.input[1], inits) != 2.0:
        return None
    mean = _one_reader(pow_node.output[0], users, "ReduceMean")
    if mean is None or not _last_axis_mean(mean, inits, None):
        return None
    add = _one_reader(mean.output[0], users, "Add")
    eps = _scalar(_other(add, mean.output[0]), inits) if add is not None else None
    if eps is None or eps <= 0:
        return None
    sqrt = _one_reader(add.output[0], users, "Sqrt")
    if sqrt is None:
        return None
    stats = [pow_node, mean, add, sqrt]
    rec = _one_reader(sqrt.output[0], users, "Reciprocal")
    if rec is not None:  # x * (1 / sqrt(...)): what torch.rsqrt traces to
        scale_of = _one_reader(rec.output[0], users, "Mul")
        if scale_of is None or _other(scale_of, rec.output[0]) != x:
            return None
        stats += [rec, scale_of]
    else:  # x / sqrt(...): Hugging Face-style RMSNorm code
        scale_of = _one_reader(sqrt.output[0], users, "Div")
        if scale_of is None or list(scale_of.input) != [x, sqrt.output[0]]:
            return None
        stats.append(scale_of)
    normed = scale_of.output[0]
    muls = users.get(normed, [])
    weighted = []
    for m in muls:
        w = _other(m, normed) if m.op_type == "Mul" else None
        t = inits.get(w) if w else None
        if t is None or len(t.dims) != 1 or (hidden is not None and t.dims[0] != hidden):
            return None
        weighted.append((m, w))
    if not weighted:
        return None
    return x, eps, weighted, stats


def fuse_rmsnorm(model: onnx.ModelProto, hidden_size: int | None = None) -> int:
    """Replace each traced RMSNorm (Pow, ReduceMean, Add eps, Sqrt, Reciprocal + Mul or Div, Mul by
    the weight) by SimplifiedLayerNormalization(x, weight); in place. Returns the number of norms fused.

    A norm bias stays the Add after it (the op has no bias input). Matches only that exact shape over
    the last axis with a [hidden_size] weight; anything else is left alone, and the caller compares
    the count with the model's norms. Each fused node is named after its weight Mul's module
    (`/model/layers.0/ln1/SimplifiedLayerNormalization`).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users = consumers(g)
    drop: set[int] = set()
    new: dict[int, onnx.NodeProto] = {}
    count = 0
    for n in g.node:
        if n.op_type != "Pow" or id(n) in drop:
            continue
        found = _match(n, users, inits, hidden_size)
        if found is None:
            continue
        x, eps, weighted, stats = found
        for mul, weight in weighted:
            where = mul.name.rsplit("/", 1)[0] if "/" in mul.name else ""
            new[id(mul)] = onnx.helper.make_node(FUSED_OP, [x, weight], [mul.output[0]], name=f"{where}/{FUSED_OP}",
                                                 axis=-1, epsilon=eps, stash_type=1)
            count += 1
        drop |= {id(s) for s in stats}
    if not count:
        return 0
    nodes = [new.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    remove_dead(g)  # the statistics' constants and value_info
    return count


def count_norms(num_layers: int, has_ln2: bool) -> int:
    """How many norms the model has: one or two a block, and the final one."""
    return num_layers * (2 if has_ln2 else 1) + 1


def check_model_file(path: str | Path) -> None:
    """onnx.checker.check_model on a saved graph whose ORT default-domain contrib ops the checker
    cannot know; raises onnx.checker.ValidationError like the checker.

    Checked by path (so the external data files are checked too) from a copy written beside it, with
    those nodes moved to a custom domain for the check only; a graph without them is checked as is.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    odd = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ORT_DEFAULT_DOMAIN_OPS]
    if not odd:
        onnx.checker.check_model(str(path))
        return
    for n in odd:
        n.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    probe = path.with_name(f".{path.stem}.check.onnx")
    try:
        onnx.save(model, str(probe))
        onnx.checker.check_model(str(probe))
    finally:
        probe.unlink(missing_ok=True)


__all__ = ["fuse_rmsnorm", "count_norms", "check_model_file", "FUSED_OP", "ORT_DEFAULT_DOMAIN_OPS"]
