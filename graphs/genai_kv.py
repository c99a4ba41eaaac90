"""The shared-buffer graph (model.kv.onnx, graphs/gqa.py) with onnxruntime-genai's inputs, and its genai_config.

Why a variant: genai runs a decoder whose cache is one [batch, kv_heads, max_length, head_size]
buffer per layer (search.past_present_share_buffer = true) and feeds it `attention_mask`
[batch, total_length] (ones for every token in the cache after this step, zeros for padding), never
GroupQueryAttention's own `seqlens_k` / `total_sequence_length`, which model.kv.onnx asks for.
So this graph derives them in front of the same nodes, as genai's own model builder does
(src/python/py/models/builder.py: ReduceSum(mask, 1) - 1 -> int32, Shape(mask)[1] -> int32):

    seqlens_k[b]          = sum(attention_mask[b]) - 1
    total_sequence_length = attention_mask.shape[1]

Everything else (weights in model.onnx.data, rotary caches, logits, the cache names) is
model.kv.onnx's. The runtime keeps using model.kv.onnx; this file is for genai only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.interface import (ATTENTION_MASK, INPUT_IDS, KV_MODEL_FILE, LOGITS, PAST_KEY, PAST_VALUE, PRESENT_KEY,
                               PRESENT_VALUE, SEQLENS_K, TOTAL_SEQUENCE_LENGTH)

GENAI_KV_MODEL_FILE = "model.genai.onnx"
PREFIX = "/model/genai_mask"


class GenaiKvError(ValueError):
    pass


def to_genai_kv(kv: onnx.ModelProto) -> onnx.ModelProto:
    """model.kv.onnx (as loaded with load_external_data=False) -> the same graph fed by attention_mask."""
    m = onnx.ModelProto()
    m.CopyFrom(kv)
    g = m.graph
    names = [i.name for i in g.input]
    if SEQLENS_K not in names or TOTAL_SEQUENCE_LENGTH not in names:
        raise GenaiKvError(f"the graph has no {SEQLENS_K} / {TOTAL_SEQUENCE_LENGTH} inputs; pass model.kv.onnx")
    if ATTENTION_MASK in names:
        raise GenaiKvError(f"the graph already takes {ATTENTION_MASK}; nothing to do")
    batch = next(i for i in g.input if i.name == INPUT_IDS).type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or "batch_size"
    kept = [i for i in g.input if i.name not in (SEQLENS_K, TOTAL_SEQUENCE_LENGTH)]
    del g.input[:]
    g.input.append(kept[0])  # input_ids
    g.input.append(helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, [batch_dim, "total_sequence_length"]))
    g.input.extend(kept[1:])
    consts = [numpy_helper.from_array(np.array([1], np.int64), f"{PREFIX}/axis1"),
              numpy_helper.from_array(np.array(1, np.int64), f"{PREFIX}/one"),
              numpy_helper.from_array(np.array(1, np.int64), f"{PREFIX}/index1")]
    nodes = [
        helper.make_node("ReduceSum", [ATTENTION_MASK, f"{PREFIX}/axis1"], [f"{PREFIX}/lengths"], keepdims=0,
                         name=f"{PREFIX}/ReduceSum"),
        helper.make_node("Sub", [f"{PREFIX}/lengths", f"{PREFIX}/one"], [f"{PREFIX}/last"], name=f"{PREFIX}/Sub"),
        helper.make_node("Cast", [f"{PREFIX}/last"], [SEQLENS_K], to=TensorProto.INT32, name=f"{PREFIX}/seqlens_k"),
        helper.make_node("Shape", [ATTENTION_MASK], [f"{PREFIX}/shape"], name=f"{PREFIX}/Shape"),
        helper.make_node("Gather", [f"{PREFIX}/shape", f"{PREFIX}/index1"], [f"{PREFIX}/total"], axis=0,
                         name=f"{PREFIX}/Gather"),
        helper.make_node("Cast", [f"{PREFIX}/total"], [TOTAL_SEQUENCE_LENGTH], to=TensorProto.INT32,
                         name=f"{PREFIX}/total_sequence_length"),
    ]
    g.initializer.extend(consts)
    for k, n in enumerate(nodes):
        g.node.insert(k, n)
    return m


def write_genai_kv_graph(folder: str | os.PathLike, out_name: str = GENAI_KV_MODEL_FILE) -> Path:
    """Read `folder/model.kv.onnx` (weights left on disk), write `folder/out_name` beside it (temp + rename)."""
    folder = Path(folder)
    kv = onnx.load(str(folder / KV_MODEL_FILE), load_external_data=False)
    new = to_genai_kv(kv)
    dst, tmp = folder / out_name, folder / f".{out_name}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(new.SerializeToString())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def genai_kv_config(genai_config: dict[str, Any], num_heads: int, filename: str = GENAI_KV_MODEL_FILE) -> dict[str, Any]:
    """The artifact's genai_config.json (for model.onnx) turned into the one for the shared-buffer variant."""
    import copy

    cfg = copy.deepcopy(genai_config)
    dec = cfg["model"]["decoder"]
    dec["filename"] = filename
    dec["num_key_value_heads"] = num_heads
    dec["inputs"] = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                     "past_key_names": PAST_KEY.replace("{i}", "%d"), "past_value_names": PAST_VALUE.replace("{i}", "%d")}
    dec["outputs"] = {"logits": LOGITS, "present_key_names": PRESENT_KEY.replace("{i}", "%d"),
                      "present_value_names": PRESENT_VALUE.replace("{i}", "%d")}
    cfg["search"]["past_present_share_buffer"] = True
    return cfg


__all__ = ["to_genai_kv", "write_genai_kv_graph", "genai_kv_config", "GENAI_KV_MODEL_FILE", "GenaiKvError"]
