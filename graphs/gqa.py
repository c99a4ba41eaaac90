"""A second decoder graph whose KV cache is one preallocated buffer per layer (com.microsoft
GroupQueryAttention), written beside the SPEC 3 `model.onnx` and sharing its weights file.

Why: SPEC 3's `present.i = Concat(past.i, new)` copies the whole cache every decode step (19 ms of
a 95 ms fp32 step at context 900) and spends ~15 small nodes per layer on attention. GQA with
`past_key` and `present_key` bound to the SAME OrtValue writes only the new positions into a
[batch, heads, max_len, head_size] buffer and does rotary + causal attention in one node. That is
how onnxruntime-genai runs decoders. `model.onnx` stays as it is (batches, raw ORT users).

What ONNX Runtime 1.32's CPU kernel needs (its schema, printed by
`onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()`, and
contrib_ops/cpu/bert/group_query_attention{.cc,_helper.h}, gqa_attention_base.h):
- query/key/value [B, S, H*hs] (BSNH, i.e. the projection outputs before the head split);
  head_size a multiple of 8, and of 16 when cos/sin caches are given, whose width (a multiple of 8)
  sets the rotated width; models outside that (partial rotary of 8 features, heads of 8 or 24)
  are rotated in front of the op by graphs/rotary.py, with do_rotary=0;
- the buffer is shared when past_key's data pointer equals present_key's (gqa_attention_base.h:
  `past_present_share_buffer = past_key_data == present_key_data && ...`); present then has the
  buffer's length max(total_sequence_length, past length) and nothing is copied;
- `seqlens_k[b]` = tokens in row b's cache after this step - 1; `total_sequence_length` = the batch
  maximum of that + 1. S == total_sequence_length means "first prompt" (positions 0..S-1, rows
  right-padded to S); S == 1 with S != total means decode: the new K/V go to row seqlens_k[b] and
  rotary uses position seqlens_k[b]; S > 1 with a past (chunked prompt) is allowed for batch 1 only.
  Rotary positions come from seqlens_k (no position_ids needed); cos/sin caches are
  [>= total_sequence_length, hs/2], rotate-half unless rotary_interleaved=1.

So batch 1 (prompt, then decode, or a prompt in chunks) works with this interface as it is.
Batch > 1 works too (tests/test_gqa.py) with RIGHT-padded prompts, not SPEC 3's left padding:
seqlens_k[b] = len_b - 1 and total_sequence_length = max len_b for the prompt, whose logits are
then read at row len_b - 1 (so `logits_to_keep` must stay 0 there, or become a per-row gather),
then lock-step decode with per-row seqlens_k. The pad rows written into the cache by the prompt
are overwritten by the row's next tokens before any query attends to them.

Caller protocol (batch 1): allocate per layer two zero OrtValues [1, H, max_len, hs] of the cache's
type (float32, or float16 from an fp16 graph); bind each as past_key_values.{i}.* AND present.{i}.*
of every Run; prompt of S tokens: seqlens_k = [S - 1], total_sequence_length = S; each decode
step at cache length P: seqlens_k = [P], total_sequence_length = P + 1. A new sequence reuses the
buffers as they are.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .maps import consumers, producers
from .optimize import remove_dead, rotary_caches
from .rotary import position_nodes, rotary_node
from runtime.interface import (
    ATTENTION_MASK,
    BATCH_DIM,
    CONFIG_FILE,
    DATA_FILE,
    INPUT_IDS,
    KV_MODEL_FILE,
    LOGITS,
    LOGITS_TO_KEEP,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
)

MAX_LEN_DIM = "max_len"  # the cache buffers' sequence axis (a symbol: the caller picks the length)
PREFIX = "/model/gqa"
# the caches the rewrite takes: GroupQueryAttention computes in the cache's type (the query, key,
# value and cos/sin caches share it); ORT's CPU kernel takes both, its CUDA kernel float16 only
CACHE_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


class GQAError(ValueError):
    pass


def _head_split_source(start: str, prod: dict[str, onnx.NodeProto], stop: set[str]) -> tuple[str, str]:
    """(x [B,S,d], heads tensor) for the Reshape -> Transpose(0,2,1,3) nearest above `start`.

    Walks producers breadth-first from `start` (through the rotary nodes, fused or traced), never
    past graph inputs or initializers, so it works whatever the projection MatMul became.
    """
    frontier, seen = [start], set()
    while frontier:
        nxt = []
        for name in frontier:
            if name in seen or name in stop:
                continue
            seen.add(name)
            node = prod.get(name)
            if node is None:
                continue
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                src = prod.get(node.input[0])
                if perm == [0, 2, 1, 3] and src is not None and src.op_type == "Reshape":
                    return src.input[0], node.output[0]
            nxt += [i for i in node.input if i]
        frontier = nxt
    raise GQAError(f"no Reshape -> Transpose(0,2,1,3) head split found above {start!r}")


def _follow(name: str, users: dict[str, list[onnx.NodeProto]], ops: tuple[str, ...]) -> onnx.NodeProto:
    """The first node of type in `ops` reached from `name` through single-reader Transposes."""
    for _ in range(4):
        readers = users.get(name, [])
        hit = [n for n in readers if n.op_type in ops]
        if hit:
            return hit[0]
        trans = [n for n in readers if n.op_type == "Transpose"]
        if len(trans) != 1:
            break
        name = trans[0].output[0]
    raise GQAError(f"no {'/'.join(ops)} reads {name!r}; not the SPEC 3 attention pattern")


def _scale(mm: onnx.NodeProto, users, inits: dict[str, onnx.TensorProto]) -> float | None:
    """The constant the scores are multiplied by right after Q K^T, when it is a scalar initializer."""
    for n in users.get(mm.output[0], []):
        if n.op_type == "Mul":
            c = [inits[i] for i in n.input if i in inits]
            if c and c[0].data_location != TensorProto.EXTERNAL:
                a = numpy_helper.to_array(c[0])
                if a.size == 1:
                    return float(a.reshape(()))
    return None


def to_gqa(model: onnx.ModelProto, num_heads: int, head_size: int, max_len: int, rope_theta: float,
           rope_interleaved: bool, rotary_dim: int | None = None) -> onnx.ModelProto:
    """Rewrite a finished SPEC 3 artifact graph (fp32, fp16, int8 or int4: the projections are found
    by the head split that follows them, whatever op they became) into the shared-buffer graph.
    Returns a new ModelProto; the input is left untouched. The cache keeps the source's type:
    float32, or float16 in an fp16 graph (whose q/k/v are float16 too, as the op needs).

    Load the source with `onnx.load(path, load_external_data=False)`: the initializers keep their
    external references into `model.onnx.data`, so the new file holds no weight bytes.
    `max_len` is the longest context the graph serves (rows of the rotary caches). `rotary_dim`
    (None: the whole head) is how many features of each head RoPE rotates: the attention op rotates
    whole heads of a multiple of 16 itself; any other model gets RotaryEmbedding nodes in front of
    it (graphs/rotary.py) and `do_rotary=0`.
    """
    rotary_dim = head_size if rotary_dim is None else int(rotary_dim)
    if head_size % 8:
        raise GQAError(f"head_size {head_size} is not a multiple of 8, which ONNX Runtime's GroupQueryAttention "
                       "needs; serve this model with model.onnx")
    if not 2 <= rotary_dim <= head_size or rotary_dim % 2:
        raise GQAError(f"rotary_dim {rotary_dim} must be an even number in 2..{head_size} (the head size)")
    in_op = rotary_dim == head_size and head_size % 16 == 0  # GroupQueryAttention's own rotary takes it
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    _sort_nodes(g)  # the fp16 converter appends its Casts at the end; each GQA node takes a node's place
    names = {i.name for i in g.input}
    layers = 0
    while PAST_KEY.format(i=layers) in names:
        layers += 1
    if not layers or ATTENTION_MASK not in names:
        raise GQAError("the graph has no past_key_values.0.key / attention_mask inputs; not a SPEC 3 artifact graph")
    past_in = {i.name: i for i in g.input}
    dtype = past_in[PAST_KEY.format(i=0)].type.tensor_type.elem_type
    if dtype not in CACHE_DTYPES:
        raise GQAError("the shared-cache graph is built from graphs with a float32 or float16 cache; this graph's "
                       f"cache is {TensorProto.DataType.Name(dtype)}")
    inits = {t.name: t for t in g.initializer}
    cos_name, sin_name = f"{PREFIX}/cos_cache", f"{PREFIX}/sin_cache"
    rotary_used = False

    for i in range(layers):
        prod, users = producers(g), consumers(g)
        pk, pv = PAST_KEY.format(i=i), PAST_VALUE.format(i=i)
        ok, ov = PRESENT_KEY.format(i=i), PRESENT_VALUE.format(i=i)
        kc, vc = prod.get(ok), prod.get(ov)
        for c, past in ((kc, pk), (vc, pv)):
            if c is None or c.op_type != "Concat" or len(c.input) != 2 or c.input[0] != past:
                raise GQAError(f"layer {i}: present is not Concat({past}, new); not the SPEC 3 attention pattern")
        stop = set(past_in) | set(inits)
        k_bsd, k_heads = _head_split_source(kc.input[1], prod, stop)
        v_bsd, v_heads = _head_split_source(vc.input[1], prod, stop)
        if v_heads != vc.input[1]:
            raise GQAError(f"layer {i}: the value heads are transformed before the cache; unsupported")
        score = _follow(ok, users, ("MatMul",))  # Q @ K^T
        pv_mm = _follow(ov, users, ("MatMul",))  # probs @ V
        k_side = {ok} | {n.output[0] for n in users.get(ok, []) if n.op_type == "Transpose"}
        q_rot = next((x for x in score.input if x not in k_side), None)
        if q_rot is None:
            raise GQAError(f"layer {i}: cannot tell the query from the key in {score.name}")
        q_bsd, q_heads = _head_split_source(q_rot, prod, stop)
        rotary = (q_rot != q_heads, kc.input[1] != k_heads)
        if rotary[0] != rotary[1]:
            raise GQAError(f"layer {i}: rotary on only one of q and k; unsupported")
        # probs @ V -> Transpose -> Reshape [B, S, d] = the o_proj input
        t = _follow(pv_mm.output[0], users, ("Reshape",))
        y = t.output[0]
        scale = _scale(score, users, inits)
        attrs = dict(num_heads=num_heads, kv_num_heads=num_heads)
        if scale is not None and abs(scale * np.sqrt(head_size) - 1.0) > 1e-6:
            attrs["scale"] = scale
        base = f"/model/layers.{i}/attn"
        gqa_in = [q_bsd, k_bsd, v_bsd, pk, pv, SEQLENS_K, TOTAL_SEQUENCE_LENGTH]
        rot_nodes = []
        if rotary[0] and in_op:
            attrs.update(do_rotary=1, rotary_interleaved=int(rope_interleaved))
            gqa_in += [cos_name, sin_name]
        elif rotary[0]:  # rotated in front of the op, which then attends only (graphs/rotary.py)
            for j, (x, part) in enumerate(((q_bsd, "q"), (k_bsd, "k"))):
                rot_nodes.append(rotary_node(x, f"{base}/{part}_rotary", f"{base}/{part}_RotaryEmbedding", num_heads,
                                             rotary_dim, rope_interleaved, cos_name, sin_name))
                gqa_in[j] = rot_nodes[-1].output[0]
        rotary_used |= rotary[0]
        node = helper.make_node("GroupQueryAttention", gqa_in, [y, ok, ov], domain="com.microsoft",
                                name=f"{base}/GroupQueryAttention", **attrs)
        # the new node takes the old Reshape's place: its inputs' producers all precede that one
        g.node.remove(kc)
        g.node.remove(vc)
        at = list(g.node).index(t)
        g.node[at].CopyFrom(node)
        for r in reversed(rot_nodes):
            g.node.insert(at, r)

    if rotary_used:
        # GroupQueryAttention types cos/sin like the query: float16 in an fp16 graph (computed in
        # float32, rounded once, as the fp16 converter rounds model.onnx's RotaryEmbedding caches)
        # [max_len, rotary_dim / 2]: the reference's angles over the rotated width
        cos, sin = (c.astype(CACHE_DTYPES[dtype]) for c in rotary_caches(rotary_dim, rope_theta, max_len))
        g.initializer.extend([numpy_helper.from_array(cos, cos_name), numpy_helper.from_array(sin, sin_name)])
        if not in_op:  # the positions GroupQueryAttention would use, from its own inputs
            nodes, consts = position_nodes()
            for k, n in enumerate(nodes):
                g.node.insert(k, n)
            g.initializer.extend(consts)
    remove_dead(g)

    used = {x for n in g.node for x in n.input}
    for stale in (ATTENTION_MASK, POSITION_IDS):
        if stale in used:
            readers = [n.name for n in g.node if stale in n.input]
            raise GQAError(f"{stale} is still read by {readers[:3]} after the rewrite; unsupported graph")
    # inputs: input_ids, seqlens_k, total_sequence_length, past..., [logits_to_keep]
    old = list(g.input)
    del g.input[:]
    g.input.append(next(x for x in old if x.name == INPUT_IDS))
    g.input.append(helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [BATCH_DIM]))
    g.input.append(helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []))
    for j in range(layers):
        for name in (PAST_KEY.format(i=j), PAST_VALUE.format(i=j)):
            g.input.append(helper.make_tensor_value_info(name, dtype, [BATCH_DIM, num_heads, MAX_LEN_DIM, head_size]))
    g.input.extend(x for x in old if x.name == LOGITS_TO_KEEP)
    for out in g.output:
        if out.name != LOGITS:
            out.CopyFrom(helper.make_tensor_value_info(out.name, dtype, [BATCH_DIM, num_heads, MAX_LEN_DIM, head_size]))
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _check_order(g)
    return m


def _sort_nodes(g: onnx.GraphProto) -> None:
    """Topological order, keeping the given order wherever it already is one (a stable Kahn sort)."""
    import heapq

    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    waits = [sum(1 for x in set(n.input) if x not in known) for n in nodes]
    readers: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for x in set(n.input):
            if x not in known:
                readers.setdefault(x, []).append(k)
    ready = [k for k, w in enumerate(waits) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for out in nodes[k].output:
            for r in readers.pop(out, []):
                waits[r] -= 1
                if waits[r] == 0:
                    heapq.heappush(ready, r)
    if len(order) != len(nodes):
        stuck = [nodes[k].name for k in range(len(nodes)) if waits[k]][:3]
        raise GQAError(f"nodes {stuck} read tensors no node produces (or a cycle); not a valid artifact graph")
    if order != list(range(len(nodes))):
        del g.node[:]
        g.node.extend(nodes[k] for k in order)


def _check_order(g: onnx.GraphProto) -> None:
    """Topological order, checked here because the contrib op keeps onnx.checker from doing it."""
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    for n in g.node:
        missing = [x for x in n.input if x not in known]
        if missing:
            raise GQAError(f"node {n.name} reads {missing} before they are produced; this is a bug in graphs.gqa")
        known.update(n.output)


def external_files(model: onnx.ModelProto) -> set[str]:
    """The data files the model's initializers point into (what the new graph shares)."""
    out = set()
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            out |= {e.value for e in t.external_data if e.key == "location"}
    return out


def kv_params(folder: str | os.PathLike) -> dict:
    """to_gqa's model arguments from an artifact's config.json (max_len = max_position_embeddings)."""
    cfg = json.loads((Path(folder) / CONFIG_FILE).read_text())
    heads = int(cfg["num_attention_heads"])
    return dict(num_heads=heads, head_size=int(cfg["hidden_size"]) // heads,
                max_len=int(cfg["max_position_embeddings"]), rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rope_interleaved=cfg.get("rope_pairing", "rotate_half") == "interleaved",
                rotary_dim=cfg.get("rotary_dim"))


def kv_graph(folder: str | os.PathLike, **params) -> onnx.ModelProto:
    """The shared-buffer graph of the artifact in `folder` (its model.onnx; weights left on disk).

    `params` override to_gqa's model arguments read from `folder/config.json`. The result
    references the same `model.onnx.data` by its relative name, so it is written (by the caller:
    export.writer) into the same folder, as KV_MODEL_FILE.
    """
    folder = Path(folder)
    src = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    kv = to_gqa(src, **{**kv_params(folder), **params})
    files = external_files(kv)
    if files - {DATA_FILE}:
        raise GQAError(f"{folder / MODEL_FILE} points into {sorted(files)}, expected only {DATA_FILE}")
    return kv


__all__ = ["to_gqa", "kv_graph", "kv_params", "external_files", "GQAError", "KV_MODEL_FILE", "SEQLENS_K",
           "TOTAL_SEQUENCE_LENGTH", "MAX_LEN_DIM"]
