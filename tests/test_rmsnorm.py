"""RMSNorm checkpoints (norm_type "rmsnorm", the seed's norm is unpublished) on the default fast path,
and the gate on a short context.

The traced RMSNorm becomes ONNX Runtime's SimplifiedLayerNormalization (graphs/rmsnorm.py); the
default build must then ship model.kv.onnx and model.genai.onnx and pass the gate, and the runtime's
greedy tokens must be the reference's. The bias-free case also has a 48-position context: below the
72 that SPEC 5's 8-token prompt + 64 greedy tokens need, so it checks that the gate shrinks its
greedy and held-out lengths to the context (one build for both, to keep the file fast).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

SHORT_CONTEXT = 48
# V 256 (K 8), d 32, heads of 16, no tokenizer: what the tracer and the gate see, in seconds rather than minutes
SMALL = dict(vocab_size=256, hidden_size=32, num_attention_heads=2, intermediate_size=64, code=dict(bits=8),
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    # plain blocks, no bias anywhere (the Llama-style layout), in a context shorter than the gate's default
    "no-bias": dict(norm_type="rmsnorm", norm_bias=False, attention_bias=False, mlp_bias=False,
                    max_position_embeddings=SHORT_CONTEXT),
    # norm bias, in the GPT-NeoX parallel block: ln1 and ln2 read one x, so the tracer shares their statistics
    "bias-neox": dict(norm_type="rmsnorm", norm_bias=True, parallel_residual=True, parallel_norms=2, rotary_dim=4,
                      rope_theta=500.0),
}
PROMPT = [5, 90, 17, 200, 42, 11, 250]


@pytest.fixture(scope="module")
def rms_builds(tmp_path_factory):
    """name -> (checkpoint, artifact) for each CASES entry, default build (kv and genai graphs, gate)."""
    from export.build import build
    from reference.config import tiny_config
    from reference.factory import make_checkpoint

    root = tmp_path_factory.mktemp("rms")
    out = {}
    for name, over in CASES.items():
        ckpt = make_checkpoint(root / name / "ckpt", tiny_config(**SMALL, **over), seed=2)
        out[name] = ckpt, build(ckpt, root / name / "art", lift_mode="arith", log=lambda m: None)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_rmsnorm_default_build_passes_the_gate_with_the_kv_graphs(rms_builds, name):
    from graphs.rmsnorm import FUSED_OP

    _, art = rms_builds[name]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    checks = {c["name"]: c for c in manifest["parity"]["checks"]}
    assert checks["kv graph: greedy tokens equal"]["passed"] and checks["genai graph: teacher-forced max|diff|"]["passed"]
    assert manifest["kv_graph"]["file"] == "model.kv.onnx" and (art / "model.genai.onnx").is_file()
    layers, norms_per_block = 2, 2
    for f in ("model.onnx", "model.kv.onnx", "model.genai.onnx"):
        g = onnx.load(str(art / f), load_external_data=False).graph
        fused = [n.name for n in g.node if n.op_type == FUSED_OP]
        assert len(fused) == layers * norms_per_block + 1, (f, fused)
        assert "/model/ln_f/SimplifiedLayerNormalization" in fused
        assert not any(n.op_type in ("Pow", "Sqrt", "Reciprocal") for n in g.node), f  # no traced statistics left


@pytest.mark.parametrize("graph", ["kv", "spec"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_runtime_greedy_equals_reference(rms_builds, name, graph):
    import runtime
    from reference.checkpoint import load_model
    from reference.generate import generate

    ckpt, art = rms_builds[name]
    ref = load_model(ckpt)
    m = runtime.load(art, provider="cpu", graph=graph)
    n = 32  # fits the short context after the prompt; the reference stops at the context too
    want = generate(ref, PROMPT, n, eos_token_id=m.eos_token_ids)
    got = m.generate(PROMPT, max_new_tokens=n)
    assert got.ids == want and (len(want) == n or want[-1] in m.eos_token_ids)


def test_short_context_gate_decodes_what_fits(rms_builds):
    """max_position_embeddings 48: 40 greedy tokens after the 8-token prompt, 40 held-out positions a row."""
    _, art = rms_builds["no-bias"]
    checks = {c["name"]: c for c in json.loads((art / "manifest.json").read_text())["parity"]["checks"]}
    fit = SHORT_CONTEXT - 8
    for row in ("greedy tokens equal", "kv graph: greedy tokens equal"):
        assert checks[row]["value"] == fit and checks[row]["bound"] == f">= {fit}", checks[row]


def test_too_short_context_is_refused_before_tracing(tmp_path):
    from export.build import build
    from export.errors import ExportError
    from reference.config import tiny_config
    from reference.factory import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_config(**SMALL, max_position_embeddings=24), seed=2)
    lines: list[str] = []
    with pytest.raises(ExportError) as e:
        build(ckpt, tmp_path / "art", lift_mode="arith", log=lines.append)
    msg = str(e.value)
    assert "\n" not in msg and "max_position_embeddings = 24" in msg and ">= 32" in msg and "--no-verify" in msg
    assert not any("trace" in x for x in lines), lines  # refused before the long stages
    assert not (tmp_path / "art").exists()


def test_rmsnorm_int8_gptj_build_passes(tmp_path):
    """A quantized RMSNorm build (int8 MatMulNBits) with a norm bias, in the one-norm GPT-J block."""
    from export.build import build
    from reference.config import tiny_config
    from reference.factory import make_checkpoint

    cfg = tiny_config(**SMALL, norm_type="rmsnorm", norm_bias=True, parallel_residual=True, parallel_norms=1,
                      rotary_dim=8, rope_pairing="interleaved")
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg, seed=2)
    art = build(ckpt, tmp_path / "art", lift_mode="arith", precision="int8", log=lambda m: None)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True and manifest["quantization"]["bits"] == 8
    assert (art / "model.kv.onnx").is_file()
    g = onnx.load(str(art / "model.kv.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "SimplifiedLayerNormalization" for n in g.node) == 2 + 1  # one norm a block, and ln_f


def test_rmsnorm_graphs_pass_the_cuda_readiness_check(rms_builds):
    """The fused norm has a CUDA kernel (ONNX Runtime's table): model.onnx stays wholly on CUDA, and so
    do the fp16 graphs made from it in memory (model.onnx, the kv graph, the genai graph: what
    `--precision fp16 --provider cuda` ships), without another trace."""
    from graphs.cuda_check import check_model, table_source
    from graphs.genai_kv import to_genai_kv
    from graphs.gqa import kv_params, to_gqa
    from graphs.quantize import to_fp16

    _, art = rms_builds["bias-neox"]
    rep = check_model(art / "model.onnx")
    assert rep.ok(), f"[{table_source()}] {rep.problems()[:5]}"
    assert rep.placed.get("ai.onnx.SimplifiedLayerNormalization") == 5
    fp16, _ = to_fp16(art / "model.onnx")
    kv = to_gqa(fp16, **kv_params(art))
    for name, model, allow_cpu in (("fp16 model.onnx", fp16, False), ("fp16 kv", kv, False),
                                   ("fp16 genai", to_genai_kv(kv), True)):
        rep = check_model(model)
        assert rep.ok(allow_cpu), f"{name} [{table_source()}]: {rep.problems(allow_cpu)[:5]}"
        assert rep.placed.get("ai.onnx.SimplifiedLayerNormalization") == 5, name


# -- the pass and the checker on hand-made graphs (milliseconds) -------------------------------------------------


def _rms_graph(d: int = 8, div: bool = False, axis: int = -1, bias: bool = False) -> onnx.ModelProto:
    """x [2, 3, d] -> RMSNorm as traced (Reciprocal + Mul) or as Hugging Face writes it (Div), then a MatMul."""
    f32 = lambda name, a: numpy_helper.from_array(np.asarray(a, np.float32), name)
    inits = [f32("two", 2.0), numpy_helper.from_array(np.array([axis], np.int64), "axes"), f32("eps", 1e-6),
             f32("w", np.linspace(0.5, 2, d)), f32("b", np.full(d, 0.25)), f32("head", np.eye(d))]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="/model/ln_f/Pow"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="/model/ln_f/ReduceMean"),
             helper.make_node("Add", ["ms", "eps"], ["mse"], name="/model/ln_f/Add"),
             helper.make_node("Sqrt", ["mse"], ["rms"], name="/model/ln_f/Sqrt")]
    if div:
        nodes.append(helper.make_node("Div", ["x", "rms"], ["normed"], name="/model/ln_f/Div"))
    else:
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"], name="/model/ln_f/Reciprocal"),
                  helper.make_node("Mul", ["x", "inv"], ["normed"], name="/model/ln_f/Mul")]
    nodes.append(helper.make_node("Mul", ["normed", "w"], ["y"], name="/model/ln_f/Mul_1"))
    last = "y"
    if bias:
        nodes.append(helper.make_node("Add", ["y", "b"], ["yb"], name="/model/ln_f/Add_1"))
        last = "yb"
    nodes.append(helper.make_node("MatMul", [last, "head"], ["logits"], name="/model/lm_head/MatMul"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, d])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("div, bias", [(False, False), (True, True)])
def test_fuse_rmsnorm_keeps_the_numbers(div, bias):
    from graphs.rmsnorm import FUSED_OP, fuse_rmsnorm

    m = _rms_graph(div=div, bias=bias)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) * 4
    want = _run(m, x)
    assert fuse_rmsnorm(m, hidden_size=8) == 1
    ops = [n.op_type for n in m.graph.node]
    assert ops == [FUSED_OP] + (["Add"] if bias else []) + ["MatMul"], ops
    assert m.graph.node[0].name == "/model/ln_f/SimplifiedLayerNormalization"
    assert not {"two", "eps", "axes"} & {t.name for t in m.graph.initializer}  # the statistics' constants went too
    np.testing.assert_allclose(_run(m, x), want, rtol=1e-5, atol=1e-5)


def test_fuse_rmsnorm_leaves_other_shapes_alone():
    from graphs.rmsnorm import fuse_rmsnorm

    # a mean over another axis; a weight of another width than the hidden size
    for m, hidden in ((_rms_graph(axis=1), 8), (_rms_graph(), 16)):
        before = [n.op_type for n in m.graph.node]
        assert fuse_rmsnorm(m, hidden_size=hidden) == 0
        assert [n.op_type for n in m.graph.node] == before


def test_checker_accepts_the_contrib_norm_and_still_checks_the_rest(tmp_path):
    from graphs.rmsnorm import check_model_file, fuse_rmsnorm

    m = _rms_graph()
    fuse_rmsnorm(m)
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    with pytest.raises(onnx.checker.ValidationError):  # what the plain checker says about the contrib op
        onnx.checker.check_model(str(path))
    check_model_file(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # the probe copy is gone
    m.graph.node[-1].input[1] = "nowhere"  # a real error is still found
    onnx.save(m, str(path))
    with pytest.raises(onnx.checker.ValidationError):
        check_model_file(path)
