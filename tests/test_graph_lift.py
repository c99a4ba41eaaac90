"""The ONNX lift against the torch reference lift: every mode, every convention, all 65,536 ids.

The oracle is `reference.lift.lift` (torch); equality is exact (the lift is small integers times a
scale, so any difference is a bug, not rounding). Budgets are computed here from SPEC 1.1, not
taken from graphs.lift.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphs.lift import (
    LiftGraphError,
    attach_lift,
    build_lift_graph,
    check_no_vocab_table,
    extract_lift,
)
from reference.config import CodeConfig
from runtime.interface import INPUTS_EMBEDS
from reference.lift import lift, random_invertible_gf2

V, K, WIDTH, OPSET = 65536, 16, 64, 18
MODES = ("bitwise", "arith", "lookup")
BITWISE_OPS = {"BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot"}
A_RAND, B_RAND = random_invertible_gf2(K, seed=7)
ALL_IDS = np.arange(V, dtype=np.int64).reshape(4, V // 4)  # batch 4 x seq 16384: every id once


def conventions() -> list[tuple[str, CodeConfig]]:
    """The default code, then every (bit order, values, tiling) with a non-identity A, b and scale."""
    out = [("default", CodeConfig())]
    for bo in ("lsb_first", "msb_first"):
        for vals in ("zero_one", "plus_minus_one"):
            for til in ("repeat", "interleave"):
                code = CodeConfig(A=A_RAND, b=B_RAND, bit_order=bo, values=vals, tiling=til, scale=0.37)
                out.append((f"{bo}-{vals}-{til}", code))
    return out


def run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def ref_lift(ids: np.ndarray, code: CodeConfig, width: int) -> np.ndarray:
    return lift(torch.from_numpy(ids), code, width).numpy()


@pytest.mark.parametrize("mode", MODES)
def test_exhaustive_every_convention(mode):
    """All V ids, each convention: the graph's output equals the torch lift bit for bit."""
    assert B_RAND.any() and not np.array_equal(A_RAND, np.eye(K))  # the recoding is really exercised
    for name, code in conventions():
        y = run(build_lift_graph(code, WIDTH, mode, OPSET), ALL_IDS)
        assert y.dtype == np.float32 and y.shape == (4, V // 4, WIDTH), name
        np.testing.assert_array_equal(y, ref_lift(ALL_IDS, code, WIDTH), err_msg=f"{mode} {name}")
        # injective: every id has its own vector
        assert len(np.unique(y.reshape(V, WIDTH), axis=0)) == V, name


@pytest.mark.parametrize("mode", MODES)
def test_full_width_and_odd_batches(mode):
    """Width 1024 (the seed's d) on a sample of ids, and a [1, 1] decode-shaped input."""
    code = CodeConfig(A=A_RAND, b=B_RAND, values="plus_minus_one", tiling="interleave", scale=2.5)
    m = build_lift_graph(code, 1024, mode, OPSET)
    ids = np.array([[0, 1, 2, 65535, 57345, 12345, 40000]], dtype=np.int64)
    np.testing.assert_array_equal(run(m, ids), ref_lift(ids, code, 1024))
    one = np.array([[65534]], dtype=np.int64)
    np.testing.assert_array_equal(run(m, one), ref_lift(one, code, 1024))


@pytest.mark.parametrize("mode", MODES)
def test_interface_ops_and_names(mode):
    m = build_lift_graph(CodeConfig(A=A_RAND, b=B_RAND), WIDTH, mode, OPSET)
    (inp,), (out,) = m.graph.input, m.graph.output
    assert inp.name == "input_ids" and inp.type.tensor_type.elem_type == TensorProto.INT64
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert out.name == "inputs_embeds" and out.type.tensor_type.elem_type == TensorProto.FLOAT
    dims = out.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_param, dims[2].dim_value] == ["batch", "seq", WIDTH]
    ops = {n.op_type for n in m.graph.node}
    if mode == "bitwise":
        assert {"BitShift", "BitwiseAnd"} <= ops
    else:
        assert not ops & BITWISE_OPS, ops
        assert {"Div", "Mod"} <= ops
    if mode == "lookup":
        assert "Gather" in ops and "MatMul" not in ops  # recoding folded into the table
    else:
        assert "MatMul" in ops  # non-identity A is applied in the graph
    assert all(n.name.startswith("/model/embed/lift/") for n in m.graph.node)
    assert len({n.name for n in m.graph.node}) == len(m.graph.node)


@pytest.mark.parametrize("mode", MODES)
def test_constants_within_spec_budget(mode):
    """SPEC 1.1: about K*K + K values (bitwise/arith), V*K bits (lookup); never a V x d table."""
    m = build_lift_graph(CodeConfig(A=A_RAND, b=B_RAND, scale=0.37), 1024, mode, OPSET)
    arrays = [numpy_helper.to_array(t) for t in m.graph.initializer]
    assert all(a.size < V for a in arrays if a.dtype.kind == "f")
    if mode == "lookup":
        (table,) = [a for a in arrays if a.size == V]
        assert table.dtype == np.uint16 and table.nbytes * 8 == V * K
        rest = sum(a.size for a in arrays if a.size != V)
        assert rest <= 3 * K + 16
    else:
        assert sum(a.size for a in arrays) <= K * K + 4 * K + 16
    check_no_vocab_table(m, V, 1024)


def test_identity_code_needs_no_matmul():
    """The fixed-code sibling (A = I, b = 0): no recoding nodes at all, still exact."""
    m = build_lift_graph(CodeConfig(), WIDTH, "arith", OPSET)
    assert not any(n.op_type == "MatMul" for n in m.graph.node)
    np.testing.assert_array_equal(run(m, ALL_IDS[:1]), ref_lift(ALL_IDS[:1], CodeConfig(), WIDTH))


def test_bad_requests_are_refused():
    singular = np.eye(K, dtype=np.uint8)
    singular[3] = singular[2]
    with pytest.raises(LiftGraphError, match="singular"):
        build_lift_graph(CodeConfig(A=singular), WIDTH, "arith", OPSET)
    with pytest.raises(LiftGraphError, match="multiple"):
        build_lift_graph(CodeConfig(), 60, "arith", OPSET)
    with pytest.raises(LiftGraphError, match="opset"):
        build_lift_graph(CodeConfig(), WIDTH, "bitwise", 17)
    with pytest.raises(LiftGraphError, match="mode"):
        build_lift_graph(CodeConfig(), WIDTH, "table", OPSET)


# -- splicing into a body ------------------------------------------------------------------------

def toy_body(width: int, out_features: int, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """inputs_embeds [batch, seq, d], attention_mask [batch, total] -> logits = x W + sum(mask), plus
    a second output; W [d, out] (out = V plays an untied lm_head, which must not be flagged)."""
    W = np.random.default_rng(seed).standard_normal((width, out_features)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["inputs_embeds", "lm_head.weight"], ["mm"], name="/lm_head/MatMul"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="/mask/Cast"),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["msum"], keepdims=1, name="/mask/ReduceSum"),
        helper.make_node("Unsqueeze", ["msum", "axis2"], ["msum3"], name="/mask/Unsqueeze"),
        helper.make_node("Add", ["mm", "msum3"], ["logits"], name="/Add"),
        helper.make_node("Identity", ["maskf"], ["mask_out"], name="/Identity"),
    ]
    graph = helper.make_graph(
        nodes, "body",
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", width]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", out_features]),
         helper.make_tensor_value_info("mask_out", TensorProto.FLOAT, ["batch", "total"])],
        initializer=[numpy_helper.from_array(W, "lm_head.weight"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                     numpy_helper.from_array(np.array([2], np.int64), "axis2")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 10
    return m, W


@pytest.mark.parametrize("mode", MODES)
def test_attach_lift_matches_reference_then_body(mode, tmp_path):
    code = CodeConfig(A=A_RAND, b=B_RAND, bit_order="msb_first", values="plus_minus_one", scale=0.5)
    body, W = toy_body(WIDTH, 32)
    m = attach_lift(body, code, mode)
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["logits", "mask_out"]
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    ids = np.array([[5, 65535, 0], [57346, 7, 31337]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=np.int64)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, mask_out = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    expect = ref_lift(ids, code, WIDTH).astype(np.float64) @ W + mask.sum(-1, keepdims=True)[:, :, None]
    np.testing.assert_allclose(logits, expect, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(mask_out, mask.astype(np.float32))
    # the lift read back out of the full model is still the exact lift, over every id
    np.testing.assert_array_equal(run(extract_lift(m), ALL_IDS), ref_lift(ALL_IDS, code, WIDTH))


def test_attach_lift_keeps_external_weights_external(tmp_path):
    """Save with external data, reload without it, attach, save: weights are never read into memory."""
    body, W = toy_body(WIDTH, V)  # a [d, V] lm_head-like weight: 16 MiB, external
    onnx.save_model(body, tmp_path / "body.onnx", save_as_external_data=True, location="body.onnx.data")
    light = onnx.load(tmp_path / "body.onnx", load_external_data=False)
    (w,) = [t for t in light.graph.initializer if t.name == "lm_head.weight"]
    assert w.data_location == TensorProto.EXTERNAL and not w.raw_data
    code = CodeConfig(A=A_RAND, b=B_RAND)
    m = attach_lift(light, code, "lookup")
    check_no_vocab_table(m, V, WIDTH)  # the [d, V] output projection is not an input table
    assert w.data_location == TensorProto.EXTERNAL and not w.raw_data
    lifted = extract_lift(m, base_dir=tmp_path)
    np.testing.assert_array_equal(run(lifted, ALL_IDS), ref_lift(ALL_IDS, code, WIDTH))
    # the spliced model runs against the original external weights
    onnx.save_model(m, tmp_path / "body.onnx")
    sess = ort.InferenceSession(str(tmp_path / "body.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 60000]], dtype=np.int64)
    logits, _ = sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, 2), np.int64)})
    np.testing.assert_allclose(logits, ref_lift(ids, code, WIDTH) @ W + 2.0, rtol=1e-5, atol=1e-3)


def test_attach_lift_refuses_wrong_body():
    body, _ = toy_body(WIDTH, 8)
    body.graph.input[0].name = "x"
    with pytest.raises(LiftGraphError, match="inputs_embeds"):
        attach_lift(body, CodeConfig(), "arith")
    body, _ = toy_body(WIDTH, 8)
    m = attach_lift(body, CodeConfig(), "arith")
    with pytest.raises(LiftGraphError):
        attach_lift(m, CodeConfig(), "arith")  # twice


# -- the "no V x d table" check can fail -----------------------------------------------------------

def table_model(table: np.ndarray, via_cast: bool) -> onnx.ModelProto:
    """The thing the project must never ship: inputs_embeds = Gather(table, input_ids)."""
    src = "table"
    nodes = []
    if via_cast:
        nodes.append(helper.make_node("Cast", ["table"], ["table_f"], to=TensorProto.FLOAT))
        src = "table_f"
    nodes.append(helper.make_node("Gather", [src, "input_ids"], [INPUTS_EMBEDS], axis=0))
    graph = helper.make_graph(
        nodes, "table",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(INPUTS_EMBEDS, TensorProto.FLOAT, ["batch", "seq", table.shape[1]])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_check_no_vocab_table_catches_an_embedding_table():
    with pytest.raises(LiftGraphError, match="embedding table"):
        check_no_vocab_table(table_model(np.zeros((V, WIDTH), np.float32), via_cast=False), V, WIDTH)
    with pytest.raises(LiftGraphError, match="embedding table"):
        check_no_vocab_table(table_model(np.zeros((V, WIDTH), np.uint8), via_cast=True), V, WIDTH)
    # a narrower table still blows the lift budget (V x 4 floats = 8x the V*K bits allowed)
    with pytest.raises(LiftGraphError, match="budget"):
        check_no_vocab_table(table_model(np.zeros((V, 4), np.float32), via_cast=False), V, WIDTH)


def test_extract_lift_reads_constants_from_external_data(tmp_path):
    """A saved artifact keeps big constants (the lookup table) in model.onnx.data: extraction finds them."""
    code = CodeConfig(A=A_RAND, b=B_RAND, tiling="interleave")
    m = build_lift_graph(code, WIDTH, "lookup", OPSET)
    onnx.save_model(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    light = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer)
    with pytest.raises(LiftGraphError, match="base_dir"):
        extract_lift(light)
    np.testing.assert_array_equal(run(extract_lift(light, base_dir=tmp_path), ALL_IDS), ref_lift(ALL_IDS, code, WIDTH))
