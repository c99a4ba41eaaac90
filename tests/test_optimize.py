"""The speed passes of graphs/optimize.py against the torch reference: the optional
`logits_to_keep` input slices the head to the last positions and changes nothing else."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import runtime
from graphs.optimize import OptimizeError, add_logits_to_keep
from runtime import interface as I

IDS = [5, 104, 65535, 57345, 300, 7, 9, 1000]


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    from reference.checkpoint import load_model

    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def want(ref) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([IDS]))[0][0].numpy()


def _feed(folder, n: int) -> tuple[ort.InferenceSession, dict]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(folder / I.MODEL_FILE), so, providers=["CPUExecutionProvider"])
    past = s.get_inputs()[3]
    feed = {I.INPUT_IDS: np.array([IDS[:n]], np.int64), I.ATTENTION_MASK: np.ones((1, n), np.int64),
            I.POSITION_IDS: np.arange(n, dtype=np.int64)[None]}
    feed.update({i.name: np.zeros((1, past.shape[1], 0, past.shape[3]), np.float32) for i in s.get_inputs()[3:]})
    return s, feed


def test_spec3_inputs_unchanged_and_default_keeps_every_position(tiny_artifacts, want):
    folder = tiny_artifacts("arith")
    s, feed = _feed(folder, len(IDS))
    # logits_to_keep is an overridable initializer, not a required input: SPEC 3 callers see no change
    assert [i.name for i in s.get_inputs()] == I.input_names(len(s.get_inputs()[3:]) // 2)
    assert [i.name for i in s.get_overridable_initializers()] == [I.LOGITS_TO_KEEP]
    got = s.run([I.LOGITS], feed)[0][0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("keep", [1, 3, 100])
def test_keep_n_gives_the_last_n_rows_of_the_reference(tiny_artifacts, want, keep):
    s, feed = _feed(tiny_artifacts("arith"), len(IDS))
    got = s.run([I.LOGITS], {**feed, I.LOGITS_TO_KEEP: np.array([keep], np.int64)})[0][0]
    n = min(keep, len(IDS))
    assert got.shape == (n, want.shape[1])
    assert np.abs(got - want[-n:]).max() <= 1e-4 * np.abs(want).max()


def test_runtime_forward_and_generate_use_it(tiny_artifacts, ref, want):
    from reference.generate import generate

    m = runtime.load(tiny_artifacts("arith"), provider="cpu")
    assert m._kv.has_logits_to_keep  # the shared-cache graph keeps the input too
    out = m.forward(np.array([IDS], np.int64), logits_to_keep=1)
    assert m._spec_graph.has_logits_to_keep
    assert out.logits.shape == (1, 1, want.shape[1])
    assert np.abs(out.logits[0, 0] - want[-1]).max() <= 1e-4 * np.abs(want).max()
    # generate's prefill binds logits_to_keep = 1: tokens equal the torch oracle's
    assert m.generate(IDS, max_new_tokens=8).ids == generate(ref, IDS, 8, eos_token_id=m.eos_token_ids)
    with pytest.raises(runtime.InputError):
        m.forward(np.array([IDS], np.int64), logits_to_keep=-1)


def test_pass_refuses_a_graph_without_a_head():
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], [I.LOGITS])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info(I.LOGITS, onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(OptimizeError, match="MatMul"):
        add_logits_to_keep(onnx.helper.make_model(g))


def test_rotary_fused_and_exact(tiny_artifacts, ref, want):
    """Every q and k rotation became one RotaryEmbedding; the logits still match the reference (above,
    and through the gate's teacher forcing); the caches equal the reference's own cos / sin."""
    from graphs.optimize import rotary_caches
    from reference.model import rope_cos_sin

    folder = tiny_artifacts("arith")
    m = onnx.load(str(folder / I.MODEL_FILE), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("RotaryEmbedding") == 2 * ref.cfg.num_hidden_layers
    assert "Split" not in ops
    cfg = ref.cfg
    cos, sin = rotary_caches(cfg.head_size, cfg.rope_theta, cfg.max_position_embeddings)
    pos = torch.arange(cfg.max_position_embeddings)[None]
    rc, rs = rope_cos_sin(pos, cfg.head_size, cfg.rope_theta)
    # numpy's and torch's float32 cos / sin may differ in the last bit; nothing more
    assert np.abs(cos - rc[0, 0].numpy()).max() <= 1e-6 and np.abs(sin - rs[0, 0].numpy()).max() <= 1e-6
    s, feed = _feed(folder, len(IDS))
    got = s.run([I.LOGITS], feed)[0][0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_split_head_is_exact_and_quantizes_as_the_head(tiny_ckpt, tmp_path, monkeypatch):
    """A head above HEAD_CHUNK_BYTES is traced as column blocks joined by a Concat: the logits (all
    positions and logits_to_keep=1) still equal the reference's, and int4's 8-bit head finds every block."""
    import export.trace
    from export.graph import export_graph, load_reference
    from export.progress import Stages
    from graphs.optimize import head_matmuls
    from graphs.quantize import quantize_nbits
    from reference.checkpoint import load_model

    monkeypatch.setattr(export.trace, "HEAD_CHUNK_BYTES", 4 * 2**20)  # the tiny head is 16 MiB: 4 blocks
    lm = load_reference(tiny_ckpt, None, {})
    path = export_graph(lm, tmp_path / "fp32", "arith", 21, Stages(lambda m: None))
    proto = onnx.load(str(path), load_external_data=False)
    heads = head_matmuls(proto.graph)
    assert len(heads) == 4
    blocks = {i.name: i for i in proto.graph.initializer}
    assert all(blocks[h.input[1]].dims[1] == 65536 // 4 for h in heads)

    ids = np.random.default_rng(3).integers(0, 65536, size=(2, 9))
    with torch.no_grad():
        want = load_model(tiny_ckpt)(torch.as_tensor(ids))[0].numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    L = lm.cfg.num_hidden_layers
    H, hs = lm.cfg.num_attention_heads, lm.cfg.head_size
    feed = {I.INPUT_IDS: ids, I.ATTENTION_MASK: np.ones_like(ids), I.POSITION_IDS: np.tile(np.arange(9), (2, 1)),
            **{n: np.zeros((2, H, 0, hs), np.float32) for n in I.past_names(L)}}
    got = sess.run([I.LOGITS], feed)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    last = sess.run([I.LOGITS], {**feed, I.LOGITS_TO_KEEP: np.array([1], np.int64)})[0]
    assert last.shape == (2, 1, 65536) and np.abs(last[:, 0] - want[:, -1]).max() <= 1e-4 * np.abs(want).max()

    qp, _ = quantize_nbits(path, bits=4, block_size=32, is_symmetric=False, head_bits=8)
    concat = next(n for n in qp.graph.node if I.LOGITS in n.output)
    producers = [next(n for n in qp.graph.node if x in n.output) for x in concat.input]
    bits = [next(a.i for a in p.attribute if a.name == "bits") for p in producers]
    assert [p.op_type for p in producers] == ["MatMulNBits"] * 4 and bits == [8] * 4
