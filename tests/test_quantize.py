"""Precision passes on a tiny traced model: each result runs in ORT CPU and stays near fp32.

The fp32 model is the reference TableFreeLM (tiny_config, random weights) traced with the dynamo
exporter on inputs_embeds, with the arith lift attached. Quality floors were measured on this
model (random weights have small top-1 margins: median 0.08 for a logit scale of ~3, so top-1
flips are easy); each floor sits below the measured value with room for thread-order noise:

  pass                     top-1 vs fp32   max |diff|   KL
  fp16 (CPU)               1.000           0.0012       <1e-7
  int8 MatMulNBits b128    0.984           0.012        1.4e-5   (the build's int8)
  int4 block 32, acc 4     0.719           0.31         1.3e-3   (block 16: 0.758; 64: 0.750)
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.build import INT_BLOCK_SIZE
from export.writer import save_onnx
from graphs.lift import attach_lift, extract_lift
from graphs.quantize import quantize_nbits, residual_adds, to_fp16
from reference.config import CodeConfig, tiny_config
from reference.lift import lift, random_invertible_gf2
from reference.model import TableFreeLM

N_LINEAR = 2 * 6 + 1  # q, k, v, o, up, down per layer, and lm_head


class Body(torch.nn.Module):
    """The reference model from inputs_embeds: what the exporter traces before attaching the lift."""

    def __init__(self, m: TableFreeLM):
        super().__init__()
        self.m = m

    def forward(self, inputs_embeds, attention_mask):
        return self.m(inputs_embeds=inputs_embeds, attention_mask=attention_mask)[0]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """(path of the fp32 model with external data, torch model, code)."""
    A, b = random_invertible_gf2(16, seed=1)
    cfg = tiny_config(code=CodeConfig(A=A, b=b))
    torch.manual_seed(0)
    model = TableFreeLM(cfg).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            Body(model), (torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.int64)),
            input_names=["inputs_embeds", "attention_mask"], output_names=["logits"],
            dynamic_shapes={"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            dynamo=True, opset_version=18, verbose=False)
    m = attach_lift(prog.model_proto, cfg.code, "arith")
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    save_onnx(m, path)
    return path, model, cfg.code


IDS = np.random.default_rng(0).integers(0, 65536, size=(4, 32))
FEED = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}


def run(path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, FEED)[0].astype(np.float32)


def quality(y: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(top-1 agreement, max |diff| / max |ref|, mean KL(ref || y)) computed in numpy."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p, q = log_softmax(ref), log_softmax(y)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    return float((y.argmax(-1) == ref.argmax(-1)).mean()), float(np.abs(y - ref).max() / np.abs(ref).max()), kl


def assert_lift_exact(path, code):
    """The pass left the lift alone: the lift read out of the new model is still exact on every id."""
    m = onnx.load(path, load_external_data=False)
    ids = np.arange(65536, dtype=np.int64).reshape(1, -1)
    sess = ort.InferenceSession(extract_lift(m, base_dir=path.parent).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"input_ids": ids})[0], lift(torch.from_numpy(ids), code, 64).numpy())


def test_fp32_model_matches_torch(fp32):
    """The fixture itself is right: ORT fp32 logits equal the torch reference (SPEC 5 bound)."""
    path, model, _ = fp32
    ref = model(torch.from_numpy(IDS))[0].detach().numpy()
    assert np.abs(run(path) - ref).max() <= 1e-4 * np.abs(ref).max()


def save(result, path):
    """A pass's (model, report) written as the build's ArtifactWriter writes it; returns the report."""
    model, report = result
    save_onnx(model, path)
    return report


def test_save_onnx(tmp_path, fp32):
    path, _, _ = fp32
    m = onnx.load(path, load_external_data=False)
    with pytest.raises(ValueError, match="base_dir"):
        save_onnx(m, tmp_path / "copy.onnx")
    save_onnx(m, tmp_path / "copy.onnx", base_dir=path.parent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "copy.onnx.data"]  # no temp left
    data = (tmp_path / "copy.onnx.data").stat().st_size
    assert data > 17_000_000 and (tmp_path / "copy.onnx").stat().st_size < data / 50  # weights are in the data file
    np.testing.assert_array_equal(run(tmp_path / "copy.onnx"), run(path))


def test_int8(tmp_path, fp32):
    """The build's int8: weight-only 8-bit MatMulNBits, block INT_BLOCK_SIZE, int8 compute."""
    path, _, code = fp32
    dst = tmp_path / "model.onnx"
    report = save(quantize_nbits(path, bits=8, block_size=INT_BLOCK_SIZE), dst)
    assert (tmp_path / "model.onnx.data").exists()
    nbits = [n for n in onnx.load(dst, load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == N_LINEAR
    assert {helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"} == {8}
    assert any(n.startswith("/model/embed/lift/") for n in report["excluded_nodes"])
    top1, rel, kl = quality(run(dst), run(path))
    assert top1 >= 0.90 and rel <= 0.05 and kl <= 2e-4, (top1, rel, kl)
    assert_lift_exact(dst, code)


def dequantize_nbits(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each MatMulNBits by MatMul with its weights unpacked in numpy (per the contrib-op spec:
    B [N, blocks, block_size/2] uint8, low nibble first; symmetric zero point 8; W = (q - 8) * scale)."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        K, N, bs = attrs["K"], attrs["N"], attrs["block_size"]
        assert attrs["bits"] == 4 and len(n.input) == 3  # symmetric: no zero-point input
        packed = numpy_helper.to_array(inits[n.input[1]])
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, -1, bs).astype(np.float32)
        scales = numpy_helper.to_array(inits[n.input[2]]).reshape(N, -1, 1)
        W = ((q - 8) * scales).reshape(N, -1)[:, :K].T.copy()
        name = n.input[1] + "_deq"
        model.graph.initializer.append(numpy_helper.from_array(W.astype(np.float32), name))
        nodes.append(helper.make_node("MatMul", [n.input[0], name], list(n.output), name=n.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_int4(tmp_path, fp32):
    path, _, code = fp32
    dst = tmp_path / "model.onnx"
    save(quantize_nbits(path, bits=4, block_size=32, accuracy_level=4), dst)
    m = onnx.load(dst)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == N_LINEAR
    for n in nbits:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
        assert attrs["N"] in (64, 256, 65536)
    assert sum(helper.get_attribute_value(a) == 65536 for n in nbits for a in n.attribute if a.name == "N") == 1  # lm_head
    top1, rel, kl = quality(run(dst), run(path))
    assert top1 >= 0.60 and rel <= 0.2 and kl <= 5e-3, (top1, rel, kl)
    assert_lift_exact(dst, code)


def test_int4_weights_and_kernel_against_numpy_unpacking(tmp_path, fp32):
    """Oracle: unpack the stored 4-bit weights in numpy. They lie within one quantization step of the
    fp32 weights, and a plain fp32 MatMul graph on them gives the MatMulNBits logits (accuracy 0)."""
    path, _, _ = fp32
    dst = tmp_path / "model.onnx"
    save(quantize_nbits(path, bits=4, block_size=16, accuracy_level=0), dst)
    src_inits = {t.name: t for t in onnx.load(path).graph.initializer}
    m = onnx.load(dst)
    deq = dequantize_nbits(onnx.load(dst))
    dq = {t.name: numpy_helper.to_array(t) for t in deq.graph.initializer if t.name.endswith("_deq")}
    inits = {t.name: t for t in m.graph.initializer}
    for n in (n for n in m.graph.node if n.op_type == "MatMulNBits"):
        W = numpy_helper.to_array(src_inits[n.input[1].removesuffix("_Q4")])
        Wq = dq[n.input[1] + "_deq"]
        scale = numpy_helper.to_array(inits[n.input[2]]).reshape(Wq.shape[1], -1)  # [N, blocks], signed
        scale_w = np.repeat(scale, 16, axis=1)[:, : Wq.shape[0]].T
        err, step = np.abs(Wq - W), np.abs(scale_w)
        assert np.all(err <= step * 1.0001), n.name
        # round to nearest, except where the code saturates (the 4-bit range is [-8, 7])
        code = np.rint(Wq / scale_w)
        assert np.all((err <= step * 0.5001) | (code == 7) | (code == -8)), n.name
    save_onnx(deq, tmp_path / "deq.onnx")
    y, y_deq = run(dst), run(tmp_path / "deq.onnx")
    assert np.abs(y - y_deq).max() <= 1e-4 * np.abs(y_deq).max()


def test_fp16_structure_and_cpu_run(tmp_path, fp32):
    path, _, code = fp32
    dst = tmp_path / "model.onnx"
    report = save(to_fp16(path), dst)
    m = onnx.shape_inference.infer_shapes(onnx.load(dst))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    inits = {t.name: t.data_type for t in m.graph.initializer}

    def dtype(name):
        return inits.get(name, types.get(name))

    kept = [n for n in m.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(kept) == 5 + 2
    for n in kept:  # computed in fp32: every input and output is float32
        assert all(dtype(i) == TensorProto.FLOAT for i in n.input if i), n.name
        assert dtype(n.output[0]) == TensorProto.FLOAT, n.name
    res = [n for n in m.graph.node if n.name in set(report["fp32_nodes"]) and n.op_type == "Add"]
    assert len(res) >= 2 * 2  # two residual adds per layer
    for n in res:
        assert all(dtype(i) == TensorProto.FLOAT for i in n.input), n.name
    # the big weights are fp16 (MatMul B inputs), the lift's A^T stays fp32
    mm_weights = [n.input[1] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    fp16_w = [w for w in mm_weights if inits[w] == TensorProto.FLOAT16]
    assert len(fp16_w) == N_LINEAR and inits["/model/embed/lift/recode/A_T"] == TensorProto.FLOAT
    assert dtype("logits") == TensorProto.FLOAT
    # no fp32 -> fp16 -> fp32 round trip: the first LayerNorm and residual add read the fp32 lift itself
    assert report["round_trip_casts_removed"] > 0
    readers = [n for n in m.graph.node if "inputs_embeds" in n.input and n.op_type != "Shape"]
    assert {"LayerNormalization", "Add"} <= {n.op_type for n in readers}, [n.name for n in readers]
    top1, rel, kl = quality(run(dst), run(path))
    assert top1 >= 0.98 and rel <= 0.01 and kl <= 1e-5, (top1, rel, kl)
    assert_lift_exact(dst, code)


def test_residual_adds_found_by_shape(fp32):
    """2 per layer: the attention and MLP sums of the residual stream, not bias or rotary adds."""
    path, _, _ = fp32
    m = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    assert len(residual_adds(m)) == 2 * 2



def test_int4_gptq_same_nodes_as_rtn_and_closer_to_fp32(tmp_path, fp32):
    """GPTQ (calibrated on text the pass samples from this graph, which has no cache inputs) writes
    the very MatMulNBits nodes RTN writes - same inputs, attributes and initializer shapes - and its
    logits are no further from fp32 than RTN's (KL on fresh ids, the numpy oracle above)."""
    path, _, code = fp32
    kw = dict(bits=4, block_size=32, is_symmetric=True, head_bits=8)
    rtn_m, _ = quantize_nbits(path, **kw)
    gptq_m, report = quantize_nbits(path, quantizer="gptq", calibration=(8, 32), **kw)
    assert report["calibration_tokens"] == 8 * 32

    def layout(m):
        inits = {t.name: (t.data_type, tuple(t.dims)) for t in m.graph.initializer}
        return [(n.op_type, tuple(n.input), tuple((a.name, a.i) for a in n.attribute), [inits.get(i) for i in n.input])
                for n in m.graph.node if n.op_type == "MatMulNBits"]

    assert layout(gptq_m) == layout(rtn_m) and len(layout(rtn_m)) == N_LINEAR
    save((rtn_m, {}), tmp_path / "rtn" / "model.onnx")
    save((gptq_m, {}), tmp_path / "gptq" / "model.onnx")
    ref = run(path)
    kl_rtn, kl_gptq = quality(run(tmp_path / "rtn" / "model.onnx"), ref)[2], quality(run(tmp_path / "gptq" / "model.onnx"), ref)[2]
    assert kl_gptq < kl_rtn, (kl_gptq, kl_rtn)
    assert_lift_exact(tmp_path / "gptq" / "model.onnx", code)
