"""Rotary embedding in front of GroupQueryAttention, for the models its own rotary cannot take.

Why: GroupQueryAttention's `do_rotary` rotates the whole head (its cos/sin caches' width sets the
rotated width, which ONNX Runtime 1.32 accepts only in multiples of 16, on heads of a multiple of
16). A partial-rotary model (GPT-NeoX's rotary_pct 0.25, GPT-J's and Phi's half head: rotary on 8
of 16 features, say) or a head of 8 or 24 features would then lose the shared-cache graph and copy
the whole cache every decode step. So for those the kv graph rotates q and k itself with
com.microsoft RotaryEmbedding (its `rotary_embedding_dim` rotates the first features of each head
and passes the rest through; rotate-half or interleaved), and the attention op runs with
`do_rotary=0`. The graph's interface stays model.kv.onnx's: the positions come from the two
inputs GroupQueryAttention itself derives them from.

GroupQueryAttention's positions (what its own rotary uses; tests/test_gqa.py checks these against
the op's rotary on whole heads): with S new tokens per row,

    S == total_sequence_length  (first prompt, rows right-padded to S):  position s
    otherwise (decode, or a prompt chunk after a past):                   seqlens_k[b] + 1 - S + s

computed below without Shape (model.kv.onnx has no run-time shape nodes; a CUDA session with CPU
fallback off would not open with them): ones like input_ids, their running sum 1..S and their
row sum S.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.interface import INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH

PREFIX = "/model/rotary_positions"
POSITIONS = f"{PREFIX}/position_ids"  # int64 [batch, sequence]: what RotaryEmbedding reads


def position_nodes() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (reading input_ids, seqlens_k, total_sequence_length) that write POSITIONS, and their constants."""
    p = PREFIX
    consts = [numpy_helper.from_array(np.array(1, np.int64), f"{p}/axis"),
              numpy_helper.from_array(np.array([1], np.int64), f"{p}/axes"),
              numpy_helper.from_array(np.array(-1, np.int64), f"{p}/minus_one")]
    nodes = [
        helper.make_node("Equal", [INPUT_IDS, INPUT_IDS], [f"{p}/same"], name=f"{p}/Equal"),
        helper.make_node("Cast", [f"{p}/same"], [f"{p}/ones"], to=TensorProto.INT64, name=f"{p}/ones"),
        helper.make_node("CumSum", [f"{p}/ones", f"{p}/axis"], [f"{p}/count"], name=f"{p}/CumSum"),  # 1..S
        helper.make_node("ReduceSum", [f"{p}/ones", f"{p}/axes"], [f"{p}/new"], keepdims=1, name=f"{p}/ReduceSum"),
        helper.make_node("Cast", [SEQLENS_K], [f"{p}/seqlens"], to=TensorProto.INT64, name=f"{p}/seqlens"),
        helper.make_node("Unsqueeze", [f"{p}/seqlens", f"{p}/axes"], [f"{p}/seqlens_b1"], name=f"{p}/Unsqueeze"),
        helper.make_node("Cast", [TOTAL_SEQUENCE_LENGTH], [f"{p}/total"], to=TensorProto.INT64, name=f"{p}/total"),
        helper.make_node("Equal", [f"{p}/new", f"{p}/total"], [f"{p}/first"], name=f"{p}/first"),
        helper.make_node("Sub", [f"{p}/seqlens_b1", f"{p}/new"], [f"{p}/later"], name=f"{p}/Sub"),  # seqlens_k - S
        helper.make_node("Where", [f"{p}/first", f"{p}/minus_one", f"{p}/later"], [f"{p}/offset"], name=f"{p}/Where"),
        helper.make_node("Add", [f"{p}/count", f"{p}/offset"], [POSITIONS], name=f"{p}/Add"),
    ]
    return nodes, consts


def rotary_node(x: str, out: str, name: str, num_heads: int, rotary_dim: int, interleaved: bool,
                cos: str, sin: str) -> onnx.NodeProto:
    """RotaryEmbedding on x [B, S, heads * head_size] (the projection, before the head split):
    the first `rotary_dim` features of each head rotated at POSITIONS, the rest passed through."""
    return helper.make_node("RotaryEmbedding", [x, POSITIONS, cos, sin], [out], name=name, domain="com.microsoft",
                            num_heads=num_heads, rotary_embedding_dim=rotary_dim, interleaved=int(interleaved))


__all__ = ["position_nodes", "rotary_node", "POSITIONS", "PREFIX"]
