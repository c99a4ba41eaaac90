"""Speed passes on the spliced fp32 graph (protobuf only: the weights stay in their data file).

`fuse_rotary`: the traced rotate-half RoPE becomes com.microsoft RotaryEmbedding (below).

`add_logits_to_keep`: a prompt of S tokens needs the vocabulary head only at its last position,
yet the traced graph runs `ln_f` and the V x d `lm_head` MatMul on all S. The pass adds an optional
graph input `logits_to_keep` (int64 [1], the Hugging Face name) whose default initializer is 0,
and slices the hidden states to their last `logits_to_keep` positions before `ln_f`. 0 keeps
every position (Slice from -0 = 0), so a caller that feeds only the SPEC 3 inputs gets exactly
the SPEC 3 `logits [batch, seq, V]`; the runtime feeds 1 during generation.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

import numpy as np

from runtime.interface import (ATTENTION_MASK, BATCH_DIM, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, PAST_KEY, PAST_SEQUENCE_DIM,
                               POSITION_IDS, PRESENT_KEY, SEQUENCE_DIM, TOTAL_SEQUENCE_DIM)

from .maps import consumers, producers

PREFIX = "/model/logits_to_keep"
ROT = "/model/rotary"
_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


class OptimizeError(ValueError):
    pass


def head_matmuls(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The MatMul(s) of the vocabulary head: the one writing `logits`, or the column blocks a
    Concat joins into `logits` (export.trace.SplitHead); [] when the graph has another shape."""
    prod = producers(graph)
    head = prod.get(LOGITS)
    if head is not None and head.op_type == "MatMul":
        return [head]
    if head is None or head.op_type != "Concat":
        return []
    parts = [prod.get(name) for name in head.input]
    if not parts or any(p is None or p.op_type != "MatMul" for p in parts):
        return []
    if len({p.input[0] for p in parts}) != 1:
        return []
    return parts


def add_logits_to_keep(model: onnx.ModelProto) -> onnx.ModelProto:
    """Insert Slice(hidden, -logits_to_keep:) in front of the final norm; in place, returned.

    Finds the head as the node producing `logits` and the final norm as the norm node feeding it
    (directly, or through a norm bias Add); refuses a graph of another shape. A traced RMSNorm must
    be fused first (graphs/rmsnorm.fuse_rmsnorm): its decomposition reads the hidden state twice.
    """
    g = model.graph
    if any(i.name == LOGITS_TO_KEEP for i in g.input):
        raise OptimizeError(f"the graph already has an input {LOGITS_TO_KEEP!r}")
    heads = head_matmuls(g)
    prod = producers(g)
    if not heads:
        found = prod.get(LOGITS)
        raise OptimizeError(f"{LOGITS} is not produced by a MatMul or a Concat of MatMuls (got "
                            f"{found.op_type if found else None}); cannot find the head")
    head = heads[0]
    # walk back from the head's activation input to the first node that is still per position only
    node = prod.get(head.input[0])
    between: list[onnx.NodeProto] = []  # the nodes from the norm to the head, whose lengths change too
    consts = {t.name for t in g.initializer}
    while node is not None and node.op_type not in _NORMS and len(between) < 8:
        # a norm bias Add (RMSNorm's op has no bias input): follow the computed input
        between.append(node)
        nxt = [i for i in node.input if i and i not in consts]
        node = prod.get(nxt[0]) if nxt else None
    if node is None or node.op_type not in _NORMS:
        raise OptimizeError(f"no final norm ({' / '.join(_NORMS)}) found in front of the head; a traced RMSNorm "
                            "must be fused first (graphs.rmsnorm.fuse_rmsnorm)")
    hidden = node.input[0]
    kept = f"{PREFIX}/hidden"
    neg = f"{PREFIX}/start"
    ends, axes = f"{PREFIX}/ends", f"{PREFIX}/axes"
    # every reader of `hidden` that lies on the head's path reads the sliced tensor; the norm is the
    # only one (the residual stream ends here), which the check below makes sure of
    readers = consumers(g).get(hidden, [])
    if readers != [node]:
        raise OptimizeError(f"the final norm's input {hidden!r} has other readers {[n.name for n in readers if n is not node]}")
    node.input[0] = kept
    new_nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [neg], name=f"{PREFIX}/Neg"),
        helper.make_node("Slice", [hidden, neg, ends, axes], [kept], name=f"{PREFIX}/Slice"),
    ]
    at = list(g.node).index(node)
    for k, n in enumerate(new_nodes):
        g.node.insert(at + k, n)
    g.initializer.extend([
        numpy_helper.from_array(np.zeros(1, np.int64), LOGITS_TO_KEEP),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), ends),
        numpy_helper.from_array(np.array([1], np.int64), axes),
    ])
    g.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    # these tensors now have logits_to_keep positions, not seq: keep their type, forget that length
    # (not the whole entry: onnx shape inference cannot redo it after ORT's SimplifiedLayerNormalization,
    # and the fp16 converter only casts tensors whose type it is told)
    stale = {o for n in (node, *between) for o in n.output}
    for vi in g.value_info:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in stale and len(dims) == 3:
            dims[1].Clear()
    return model


def _set_dims(vi: onnx.ValueInfoProto, names: dict[int, str]) -> None:
    dims = vi.type.tensor_type.shape.dim
    for axis, name in names.items():
        if axis < len(dims):
            dims[axis].Clear()
            dims[axis].dim_param = name


def name_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the graph's inputs and outputs optimum's dimension names (runtime/interface.py); in place.

    By role, not by what the tracer called them: input_ids / position_ids [batch_size,
    sequence_length], attention_mask [batch_size, past_sequence_length + sequence_length], past
    [batch_size, H, past_sequence_length, hs], present [batch_size, H, past_sequence_length +
    sequence_length, hs], logits [batch_size, sequence_length, V] (its size with the default
    logits_to_keep = 0; a caller that feeds N gets N rows). Inner value_info follows the renaming
    of the input names it used. Names only: no node changes.
    """
    g = model.graph
    want: dict[str, dict[int, str]] = {INPUT_IDS: {0: BATCH_DIM, 1: SEQUENCE_DIM},
                                       POSITION_IDS: {0: BATCH_DIM, 1: SEQUENCE_DIM},
                                       ATTENTION_MASK: {0: BATCH_DIM, 1: TOTAL_SEQUENCE_DIM},
                                       LOGITS: {0: BATCH_DIM, 1: SEQUENCE_DIM}}
    past_prefix, present_prefix = PAST_KEY.split("{")[0], PRESENT_KEY.split("{")[0]
    rename: dict[str, str] = {}
    for vi in [*g.input, *g.output]:
        if vi.name.startswith(past_prefix):
            want[vi.name] = {0: BATCH_DIM, 2: PAST_SEQUENCE_DIM}
        elif vi.name.startswith(present_prefix):
            want[vi.name] = {0: BATCH_DIM, 2: TOTAL_SEQUENCE_DIM}
        dims = vi.type.tensor_type.shape.dim
        for axis, name in want.get(vi.name, {}).items():
            if axis < len(dims) and dims[axis].dim_param:
                rename.setdefault(dims[axis].dim_param, name)
    for vi in [*g.input, *g.output]:
        if vi.name in want:
            _set_dims(vi, want[vi.name])
    for vi in g.value_info:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    return model


def rotary_caches(head_size: int, theta: float, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [max_pos, head_size/2], computed in float32 exactly as reference.model.rope_cos_sin."""
    inv_freq = (1.0 / (theta ** (np.arange(0, head_size, 2, dtype=np.float32) / head_size))).astype(np.float32)
    ang = np.arange(max_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def fuse_rotary(model: onnx.ModelProto, num_heads: int, head_size: int, theta: float, max_pos: int) -> int:
    """Replace each traced rotate-half RoPE (Split, 4 Mul, Sub, Add, Concat: 8 nodes for q, 8 for k)
    by one com.microsoft RotaryEmbedding reading position_ids and constant cos/sin caches.

    Why: decode of the quantized models is bound by per-node overhead, not bytes (int4 reads 0.24
    GB a token, yet 1300 small nodes cost as much): this drops 14 nodes per q/k, 448 in the full
    model; measured +12% int4 decode. Matches only the exact pattern the tracer writes for
    rope_pairing rotate_half; anything else is left alone. Returns the number fused.
    """
    g = model.graph
    prod, users = producers(g), consumers(g)
    drop: set[int] = set()
    new: dict[int, onnx.NodeProto] = {}
    count = 0
    for n in g.node:
        if n.op_type != "Concat" or len(n.input) != 2:
            continue
        a, b = prod.get(n.input[0]), prod.get(n.input[1])
        if a is None or b is None or a.op_type != "Sub" or b.op_type != "Add":
            continue
        muls = [prod.get(i) for i in (*a.input, *b.input)]
        if any(m is None or m.op_type != "Mul" for m in muls):
            continue
        split = prod.get(muls[0].input[0])
        if split is None or split.op_type != "Split" or len(split.output) != 2:
            continue
        x1, x2 = split.output
        cos, sin = muls[0].input[1], muls[1].input[1]
        want = [(x1, cos), (x2, sin), (x2, cos), (x1, sin)]
        if [tuple(m.input) for m in muls] != want:
            continue
        if any(u not in muls for o in split.output for u in users.get(o, [])):
            continue
        rot = helper.make_node("RotaryEmbedding", [split.input[0], POSITION_IDS, f"{ROT}/cos_cache", f"{ROT}/sin_cache"],
                               [n.output[0]], name=n.name.replace("Concat", "RotaryEmbedding"), domain="com.microsoft",
                               interleaved=0, num_heads=num_heads)
        for m in (split, *muls, a, b):
            drop.add(id(m))
        new[id(n)] = rot
        count += 1
    if not count:
        return 0
    nodes = [new.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    cos_c, sin_c = rotary_caches(head_size, theta, max_pos)
    g.initializer.extend([numpy_helper.from_array(cos_c, f"{ROT}/cos_cache"), numpy_helper.from_array(sin_c, f"{ROT}/sin_cache")])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    remove_dead(g)  # the old cos/sin computations
    return count


__all__ = ["add_logits_to_keep", "name_dims", "fuse_rotary", "rotary_caches", "OptimizeError", "PREFIX"]


def remove_dead(g: onnx.GraphProto) -> None:
    """Keep the nodes the graph outputs depend on; drop unused initializers and value_info (in place).

    Why here and not in onnx-ir: the passes that call it work on protobuf whose weights stay in
    their data file, and a leftover initializer makes ONNX Runtime warn at every session load.
    """
    prod = producers(g)
    live: set[int] = set()
    stack = [o.name for o in g.output]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        n = prod.get(name)
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack += [i for i in n.input if i]
    keep = [n for n in g.node if id(n) in live]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used or t.name == LOGITS_TO_KEEP]
    del g.initializer[:]
    g.initializer.extend(inits)
    produced = {o for n in g.node for o in n.output}
    vi = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vi)
