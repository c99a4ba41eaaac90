"""GPTQ int4 (graphs/gptq.py) against independent oracles: ORT's own 4-bit packer, ORT's
MatMulNBits kernel, the numpy matmul, and the demo build's parity gate.

- grid and layout: with no error feedback our quantizer must produce ORT's round-to-nearest
  bytes exactly (onnxruntime's C++ `quantize_matmul_4bits`), so GPTQ's levels go into the very
  layout and kernel RTN uses;
- the packed GPTQ weights dequantized in numpy equal GPTQ's own fake-quantized weights exactly,
  and ORT's MatMulNBits on them computes X @ those weights;
- on calibration activations (correlated, like a real model's) GPTQ's output error ||XW - XQ||
  is below round-to-nearest's at the same block size and symmetry, and stays below on fresh
  activations from the same distribution;
- `--precision int4` of the demo model (GPTQ, the shipped default) passes the gate.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits

from graphs.gptq import dequantize, gptq, pack_nbits, rtn, unpack_nbits


def ort_rtn(W: np.ndarray, block: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    K, N = W.shape
    kb = -(-K // block)
    B = np.zeros((N, kb, block // 2), np.uint8)
    S = np.zeros((N, kb), np.float32)
    Z = np.zeros((N, (kb + 1) // 2), np.uint8)
    quantize_matmul_4bits(B, np.ascontiguousarray(W), S, Z, block, N, K, sym)
    return B, S, Z


@pytest.mark.parametrize("K,N,block", [(256, 48, 32), (256, 48, 64), (384, 24, 128), (192, 8, 64)])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_grid_and_packing_are_orts_own(K, N, block, sym):
    W = np.random.default_rng(K + N + block).standard_normal((K, N)).astype(np.float32)
    W[:, 1] = 0.0  # an all-zero block: scale 0
    W[:, 2] = np.abs(W[:, 2])  # one-signed blocks: the zero point clamps
    B, S, Z = pack_nbits(*rtn(W, block, sym), block)
    oB, oS, oZ = ort_rtn(W, block, sym)
    np.testing.assert_array_equal(B, oB)
    np.testing.assert_array_equal(S, oS)
    if not sym:  # symmetric nodes carry no zero point (implicitly 8)
        np.testing.assert_array_equal(Z, oZ)


def correlated(n: int, K: int, seed: int) -> np.ndarray:
    """Activations with a few strong directions and unequal channel scales, as LayerNorm/GELU outputs have."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(7).standard_normal((K, K)).astype(np.float32) / np.sqrt(K)
    mix[:, :4] *= 6.0
    return ((rng.standard_normal((n, K)) @ mix) * np.linspace(0.3, 2.0, K)).astype(np.float32)


def matmul_nbits(x: np.ndarray, B, S, Z, K: int, N: int, block: int) -> np.ndarray:
    """One MatMulNBits node (accuracy level 0: fp32 compute) run by ORT."""
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(S.reshape(-1), "S")]
    ins = ["x", "B", "S"]
    if Z is not None:
        inits.append(numpy_helper.from_array(Z.reshape(-1), "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=block)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("block,sym", [(32, False), (64, True), (128, False), (128, True)])
def test_gptq_packed_weights_are_its_fake_quant_and_beat_rtn(block, sym):
    K, N = 256, 96
    W = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32) * 0.05
    X = correlated(1024, K, seed=2)
    q, s, z = gptq(W, X.T.astype(np.float64) @ X, block, sym)
    Wq = dequantize(q, s, z, block)
    B, S, Z = pack_nbits(q, s, z, block)
    np.testing.assert_array_equal(unpack_nbits(B, S, None if sym else Z, K, block), Wq)
    assert q.max() <= 15
    # ORT's kernel reads the same weights: MatMulNBits(x) == x @ Wq (numpy oracle)
    x = X[:16]
    y = matmul_nbits(x, B, S, None if sym else Z, K, N, block)
    np.testing.assert_allclose(y, x @ Wq, rtol=0, atol=1e-4 * np.abs(x @ Wq).max())

    W_rtn = dequantize(*rtn(W, block, sym), block)
    fresh = correlated(1024, K, seed=3)
    for A in (X, fresh):  # calibration activations, then unseen ones from the same distribution
        err_gptq = np.linalg.norm(A @ W - A @ Wq)
        err_rtn = np.linalg.norm(A @ W - A @ W_rtn)
        assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


def test_gptq_identity_hessian_without_feedback_is_rtn():
    """With H = I and no damping the error feedback is zero (off-diagonal H^-1 = 0): GPTQ is RTN."""
    W = np.random.default_rng(4).standard_normal((128, 32)).astype(np.float32)
    for sym in (True, False):
        for a, b in zip(gptq(W, np.eye(128), 32, sym, percdamp=0.0), rtn(W, 32, sym)):
            np.testing.assert_array_equal(a, b)


def test_int4_demo_build_with_gptq_passes_gate(tmp_path):
    """`--precision int4` (GPTQ, the shipped default) of the trained demo model: the gate passed, the
    manifest says how the weights were made, and every MatMul of the body runs the 4-bit
    MatMulNBits kernel at the shipped block size and accuracy level 4."""
    from export.build import INT4_QUANTIZER, INT4_SETTINGS, build
    from tests.demo import DEMO_MODEL_DIR

    out = build(DEMO_MODEL_DIR, tmp_path / "int4", lift_mode="arith", precision="int4", log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    q = manifest["quantization"]
    assert q["quantizer"] == INT4_QUANTIZER == "gptq" and q["calibration_tokens"] == 16 * 128
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    weights = {t.name for t in m.graph.initializer}
    assert not [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in weights
                and "/lift/" not in n.name]  # every constant-weight MatMul but the lift's became MatMulNBits
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in nodes}
    body = [a for name, a in attrs.items() if "lm_head" not in name]
    head = [a for name, a in attrs.items() if "lm_head" in name]
    assert len(body) == 6 * 4 and head  # q k v o up down in each of the 4 layers
    setting = INT4_SETTINGS["gptq"]
    assert all(a["bits"] == 4 for a in body) and all(a["bits"] == setting["head_bits"] for a in head)
    assert all(a["accuracy_level"] == 4 and a["block_size"] == setting["block_size"] for a in attrs.values())
    assert all((len(n.input) > 3 and n.input[3] != "") != setting["is_symmetric"] for n in nodes)  # zero points iff asym


def test_quantizer_flag_is_refused_before_any_work(tmp_path):
    """--quantizer applies to int4 only, and an unknown one is named: both refused by the cheap checks."""
    from export.build import build
    from export.errors import ExportError

    with pytest.raises(ExportError, match="--quantizer gptq applies to --precision int4 only"):
        build("no-such-model", tmp_path / "a", precision="int8", quantizer="gptq", log=lambda m: None)
    with pytest.raises(ExportError, match="--quantizer awq: unknown; choose one of rtn, gptq"):
        build("no-such-model", tmp_path / "b", precision="int4", quantizer="awq", log=lambda m: None)
