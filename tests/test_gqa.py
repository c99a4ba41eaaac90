"""The shared-buffer GroupQueryAttention graph (graphs/gqa.py) against two oracles: the torch
reference on the whole sequence (teacher forcing) and the SPEC 3 `model.onnx` stepped with its
Concat cache. The GQA graph is driven as the runtime would: one [1, H, max_len, hs] OrtValue per
past/present pair, bound as both input and output of every Run."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from graphs.gqa import (  # noqa: E402
    KV_MODEL_FILE,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    GQAError,
    external_files,
    kv_graph,
    kv_params,
    to_gqa,
)
from export.writer import atomic_write  # noqa: E402
from runtime.interface import (  # noqa: E402
    ATTENTION_MASK,
    BATCH_DIM,
    DATA_FILE,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    MODEL_FILE,
    POSITION_IDS,
    past_names,
    present_names,
)

PROMPT_LEN, DECODE_STEPS = 11, 34


def write_kv_graph(folder: Path) -> Path:
    """What the build does (export.build.write_kv through the ArtifactWriter), on a test folder."""
    return atomic_write(folder / KV_MODEL_FILE, kv_graph(folder).SerializeToString())


def _copy_artifact(src: Path, dst: Path) -> Path:
    """The session fixture's folder is shared with other tests: write the new graph into a copy."""
    dst.mkdir(parents=True)
    for name in (MODEL_FILE, DATA_FILE, "config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def _session(path: Path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cache_dtype(sess) -> type:
    """The graph's cache type: float16 in fp16 artifacts, float32 otherwise."""
    t = next(i.type for i in sess.get_inputs() if i.name == past_names(1)[0])
    return np.float16 if t == "tensor(float16)" else np.float32


class KVStepper:
    """Batch-1 driver of the GQA graph: the cache buffers are allocated once and never copied."""

    def __init__(self, folder: Path, layers: int, heads: int, head_size: int, max_len: int):
        self.sess = _session(folder / KV_MODEL_FILE)
        self.layers = layers
        dtype = _cache_dtype(self.sess)
        self.bufs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, max_len, head_size), dtype))
                     for _ in range(2 * layers)]
        self.length = 0  # tokens in the cache
        self.shared = True

    def step(self, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        S = ids.shape[1]
        b = self.sess.io_binding()
        b.bind_cpu_input(INPUT_IDS, ids)
        b.bind_cpu_input(SEQLENS_K, np.array([self.length + S - 1], np.int32))
        b.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(self.length + S, np.int32))
        if keep:
            b.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array([keep], np.int64)))
        b.bind_output(LOGITS, "cpu")
        for past, present, buf in zip(past_names(self.layers), present_names(self.layers), self.bufs):
            b.bind_ortvalue_input(past, buf)
            b.bind_ortvalue_output(present, buf)
        self.sess.run_with_iobinding(b)
        out = b.get_outputs()
        self.shared &= all(o.data_ptr() == buf.data_ptr() for o, buf in zip(out[1:], self.bufs))
        self.length += S
        return out[0].numpy()


class SpecStepper:
    """The SPEC 3 graph with its Concat cache (plain session.run, numpy in and out)."""

    def __init__(self, folder: Path, layers: int, heads: int, head_size: int):
        self.sess = _session(folder / MODEL_FILE)
        self.layers = layers
        dtype = _cache_dtype(self.sess)
        self.past = {n: np.zeros((1, heads, 0, head_size), dtype) for n in past_names(layers)}
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        S, P = ids.shape[1], self.length
        out = self.sess.run(None, {INPUT_IDS: ids, ATTENTION_MASK: np.ones((1, P + S), np.int64),
                                   POSITION_IDS: np.arange(P, P + S, dtype=np.int64)[None], **self.past})
        self.past = dict(zip(past_names(self.layers), out[1:]))
        self.length += S
        return out[0]


@pytest.fixture(scope="module")
def kv_fp32(tiny_artifacts, tmp_path_factory) -> Path:
    folder = _copy_artifact(tiny_artifacts("bitwise", "fp32"), tmp_path_factory.mktemp("kv") / "fp32")
    write_kv_graph(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from reference.checkpoint import load_model

    return load_model(tiny_ckpt)


def _dims(folder: Path) -> tuple[int, int, int, int]:
    """(layers, heads, head_size, max_len) of an artifact."""
    p = kv_params(folder)
    inputs = {i.name for i in onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph.input}
    layers = sum(1 for n in past_names(1024) if n.endswith(".key") and n in inputs)
    return layers, p["num_heads"], p["head_size"], p["max_len"]


def _prompt(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (1, PROMPT_LEN)).astype(np.int64)


def test_interface(kv_fp32):
    layers, H, hs, max_len = _dims(kv_fp32)
    s = _session(kv_fp32 / KV_MODEL_FILE)
    ins = {i.name: i for i in s.get_inputs()}
    assert list(ins) == [INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *past_names(layers)]
    assert ins[SEQLENS_K].type == "tensor(int32)" and ins[TOTAL_SEQUENCE_LENGTH].shape == []
    assert ins[past_names(layers)[0]].shape == [BATCH_DIM, H, "max_len", hs]
    assert ins[SEQLENS_K].shape == [BATCH_DIM] and ins[INPUT_IDS].shape == [BATCH_DIM, "sequence_length"]
    assert LOGITS_TO_KEEP in {i.name for i in s.get_overridable_initializers()}
    assert [o.name for o in s.get_outputs()] == [LOGITS, *present_names(layers)]
    g = onnx.load(str(kv_fp32 / KV_MODEL_FILE), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("GroupQueryAttention") == layers
    assert {"Softmax", "Concat", "RotaryEmbedding"}.isdisjoint(ops)  # the old attention is gone
    names = [n.name for n in g.node if n.op_type == "GroupQueryAttention"]
    assert names == [f"/model/layers.{i}/attn/GroupQueryAttention" for i in range(layers)]


def test_prefill_decode_matches_spec_graph_and_reference(kv_fp32, reference):
    layers, H, hs, max_len = _dims(kv_fp32)
    kv, spec = KVStepper(kv_fp32, layers, H, hs, max_len), SpecStepper(kv_fp32, layers, H, hs)
    prompt = _prompt()
    a, b = kv.step(prompt), spec.step(prompt)
    scale = np.abs(b).max()
    assert a.shape == b.shape == (1, PROMPT_LEN, 65536)
    assert np.abs(a - b).max() <= 1e-4 * scale
    kv_logits, tokens = [a[0]], []
    for _ in range(DECODE_STEPS):
        t_kv, t_spec = int(a[0, -1].argmax()), int(b[0, -1].argmax())
        assert t_kv == t_spec
        tokens.append(t_kv)
        ids = np.array([[t_kv]], np.int64)
        a, b = kv.step(ids), spec.step(ids)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
        kv_logits.append(a[0])
    assert kv.shared, "present was not written into the bound past buffer"
    # the buffer holds exactly the SPEC graph's cache in its first rows, zeros after
    n = kv.length
    for buf, name in zip(kv.bufs, past_names(layers)):
        arr = buf.numpy()
        np.testing.assert_allclose(arr[:, :, :n], spec.past[name], atol=1e-5 * np.abs(spec.past[name]).max())
        assert not arr[:, :, n:].any()
    # teacher forcing against the torch reference on the whole sequence at once
    seq = torch.tensor(np.concatenate([prompt[0], tokens]))[None]
    with torch.no_grad():
        ref, _ = reference(seq, torch.ones_like(seq), torch.arange(seq.shape[1])[None], None)
    ref = ref[0].numpy()
    got = np.concatenate(kv_logits)  # positions 0 .. PROMPT_LEN + DECODE_STEPS - 1
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, err
    assert (ref[PROMPT_LEN - 1:-1].argmax(-1) == np.array(tokens)).all()  # greedy tokens identical


def test_chunked_prompt_and_logits_to_keep(kv_fp32):
    """A prompt fed in two chunks (batch 1 allows S > 1 with a past) and with logits_to_keep=1
    gives the last-position logits of the whole prompt in one piece."""
    layers, H, hs, max_len = _dims(kv_fp32)
    prompt = _prompt(1)
    whole = KVStepper(kv_fp32, layers, H, hs, max_len).step(prompt)
    split = KVStepper(kv_fp32, layers, H, hs, max_len)
    first = split.step(prompt[:, :4])
    rest = split.step(prompt[:, 4:], keep=1)
    assert rest.shape == (1, 1, 65536)
    scale = np.abs(whole).max()
    assert np.abs(first[0] - whole[0, :4]).max() <= 1e-4 * scale
    assert np.abs(rest[0, 0] - whole[0, -1]).max() <= 1e-4 * scale


def test_right_padded_batch_matches_rows_alone(kv_fp32):
    """Batch > 1 works when prompts are RIGHT-padded: seqlens_k[b] = len_b - 1, total = max len;
    then lock-step decode with per-row seqlens_k. Each row must give what the SPEC graph gives
    for it alone (rows read at their own last position; pad rows of the cache are overwritten
    before they are ever attended)."""
    layers, H, hs, max_len = _dims(kv_fp32)
    sess = _session(kv_fp32 / KV_MODEL_FILE)
    lens = [5, PROMPT_LEN]
    rows = [_prompt(3)[0, :n] for n in lens]
    ids = np.full((2, max(lens)), 57344, np.int64)  # pad id; any id works, those rows are never read
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
    bufs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((2, H, max_len, hs), np.float32)) for _ in range(2 * layers)]

    def run(x: np.ndarray, seqlens: list[int]) -> np.ndarray:
        b = sess.io_binding()
        b.bind_cpu_input(INPUT_IDS, x)
        b.bind_cpu_input(SEQLENS_K, np.array(seqlens, np.int32))
        b.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(max(seqlens) + 1, np.int32))
        b.bind_output(LOGITS, "cpu")
        for past, present, buf in zip(past_names(layers), present_names(layers), bufs):
            b.bind_ortvalue_input(past, buf)
            b.bind_ortvalue_output(present, buf)
        sess.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    specs = [SpecStepper(kv_fp32, layers, H, hs) for _ in rows]
    got = run(ids, [n - 1 for n in lens])
    want = [sp.step(row[None]) for sp, row in zip(specs, rows)]
    toks = []
    for r, n in enumerate(lens):
        assert np.abs(got[r, n - 1] - want[r][0, -1]).max() <= 1e-4 * np.abs(want[r]).max()
        toks.append(int(want[r][0, -1].argmax()))
    cur = list(lens)
    for _ in range(8):
        got = run(np.array(toks, np.int64)[:, None], cur)
        want = [sp.step(np.array([[t]], np.int64)) for sp, t in zip(specs, toks)]
        for r in range(2):
            assert np.abs(got[r, 0] - want[r][0, 0]).max() <= 1e-4 * np.abs(want[r]).max()
        toks = [int(w[0, 0].argmax()) for w in want]
        cur = [c + 1 for c in cur]


def test_no_duplicated_weights(kv_fp32, tiny_artifacts):
    data = kv_fp32 / DATA_FILE
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    write_kv_graph(kv_fp32)  # rewriting leaves the shared data file as it was
    assert hashlib.sha256(data.read_bytes()).hexdigest() == before
    src = onnx.load(str(kv_fp32 / MODEL_FILE), load_external_data=False)
    kv = onnx.load(str(kv_fp32 / KV_MODEL_FILE), load_external_data=False)
    assert external_files(kv) == {DATA_FILE}

    def ext(m):
        return {t.name: tuple((e.key, e.value) for e in t.external_data)
                for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}

    src_ext, kv_ext = ext(src), ext(kv)
    # every weight the new graph uses is the same byte range of the same file
    assert kv_ext and all(src_ext[n] == ref for n, ref in kv_ext.items())
    # the linear layers' weights are all external (none copied inline)
    inline = {t.name: len(t.raw_data) for t in kv.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    assert not any(n.endswith(("weight_t", "_Q4", "_Q8")) for n in inline)
    # the file is no bigger than the SPEC graph's protobuf (which holds the same small constants)
    assert (kv_fp32 / KV_MODEL_FILE).stat().st_size <= (kv_fp32 / MODEL_FILE).stat().st_size
    assert (kv_fp32 / KV_MODEL_FILE).stat().st_size < data.stat().st_size / 20


@pytest.mark.parametrize("precision", [pytest.param("int8", marks=pytest.mark.slow), "int4"])
def test_quantized_matches_its_spec_graph(tiny_artifacts, tmp_path, precision):
    """Whatever the MatMuls became (MatMulNBits here), the rewrite finds the projections.
    Same weights, so the bound is fp32's; on the full-size model the int8 activations of
    MatMulNBits amplify ulp differences and only the quality matches (benchmarks/probe_gqa.py)."""
    folder = _copy_artifact(tiny_artifacts("bitwise", precision), tmp_path / precision)
    write_kv_graph(folder)
    kv = onnx.load(str(folder / KV_MODEL_FILE), load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" for n in kv.node)
    layers, H, hs, max_len = _dims(folder)
    kv, spec = KVStepper(folder, layers, H, hs, max_len), SpecStepper(folder, layers, H, hs)
    a, b = kv.step(_prompt(2)), spec.step(_prompt(2))
    for _ in range(DECODE_STEPS):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
        t = int(b[0, -1].argmax())
        assert int(a[0, -1].argmax()) == t
        ids = np.array([[t]], np.int64)
        a, b = kv.step(ids), spec.step(ids)
    assert kv.shared


def test_fp16_keeps_a_float16_cache_and_matches_its_spec_graph(tiny_artifacts, tmp_path):
    """An fp16 model.onnx (its nodes out of order: the fp16 converter appends its Casts) becomes a
    kv graph whose cache, q/k/v and cos/sin caches are float16, computing what model.onnx does up
    to fp16 rounding. The bound: the two graphs compute attention differently in float16 (GQA vs
    MatMul/Softmax), so they agree to a few fp16 ulps of the logits' scale, not fp32's 1e-4; the
    fed tokens are model.onnx's picks, so a near-tie cannot make the two runs diverge."""
    folder = _copy_artifact(tiny_artifacts("arith", "fp16"), tmp_path / "fp16")
    write_kv_graph(folder)
    g = onnx.load(str(folder / KV_MODEL_FILE), load_external_data=False).graph
    f16 = onnx.TensorProto.FLOAT16
    assert all(i.type.tensor_type.elem_type == f16 for i in g.input if i.name.startswith("past_key_values"))
    assert all(o.type.tensor_type.elem_type == f16 for o in g.output if o.name.startswith("present"))
    assert {t.data_type for t in g.initializer if t.name.startswith("/model/gqa/")} == {f16}
    layers, H, hs, max_len = _dims(folder)
    kv, spec = KVStepper(folder, layers, H, hs, max_len), SpecStepper(folder, layers, H, hs)
    a, b = kv.step(_prompt(2)), spec.step(_prompt(2))
    worst = 0.0
    for _ in range(DECODE_STEPS):
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
        ids = np.array([[int(b[0, -1].argmax())]], np.int64)
        a, b = kv.step(ids), spec.step(ids)
    assert worst <= 1e-2, worst  # measured 0 here (both round attention to fp16); fp32 agrees to 1e-4
    assert kv.shared
    assert all(buf.numpy().dtype == np.float16 for buf in kv.bufs)


def test_the_runtime_reads_the_cache_type_from_the_file(kv_fp32):
    """runtime.load picks the kv graph on CUDA only for a float16 cache, read before any session opens."""
    from runtime.model import _kv_cache_fp16
    from runtime.onnx_proto import FLOAT, graph_input_type

    assert graph_input_type(kv_fp32 / KV_MODEL_FILE, past_names(1)[0]) == FLOAT
    assert graph_input_type(kv_fp32 / KV_MODEL_FILE, "no such input") is None
    assert _kv_cache_fp16(kv_fp32) is False


def test_refuses_what_it_cannot_serve(kv_fp32):
    src = onnx.load(str(kv_fp32 / MODEL_FILE), load_external_data=False)
    p = kv_params(kv_fp32)
    with pytest.raises(GQAError, match="multiple of 8"):
        to_gqa(src, **{**p, "head_size": 12})
    with pytest.raises(GQAError, match="rotary_dim 5 must be an even number"):
        to_gqa(src, **{**p, "rotary_dim": 5})
    kv = onnx.load(str(kv_fp32 / KV_MODEL_FILE), load_external_data=False)
    with pytest.raises(GQAError, match="not a SPEC 3 artifact graph"):
        to_gqa(kv, **p)  # already rewritten: no attention_mask


def _attention_graph(H: int, hs: int, max_len: int, interleaved: bool, in_op: bool) -> bytes:
    """q, k, v -> GroupQueryAttention, rotating whole heads itself (in_op) or behind the RotaryEmbedding
    nodes and positions of graphs/rotary.py (do_rotary=0), with the same cos/sin caches."""
    from onnx import TensorProto, helper, numpy_helper

    from graphs.optimize import rotary_caches
    from graphs.rotary import position_nodes, rotary_node

    f = TensorProto.FLOAT
    cos, sin = rotary_caches(hs, 10000.0, max_len)
    inits = [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")]
    nodes, qk = [], ["q", "k"]
    if not in_op:
        pos, consts = position_nodes()
        nodes, inits = pos, inits + consts
        nodes += [rotary_node(x, f"{x}_rot", f"{x}_rot", H, hs, interleaved, "cos", "sin") for x in qk]
        qk = ["q_rot", "k_rot"]
    attrs = dict(do_rotary=1, rotary_interleaved=int(interleaved)) if in_op else {}
    extra = ["cos", "sin"] if in_op else []
    nodes.append(helper.make_node("GroupQueryAttention", [*qk, "v", "pk", "pv", SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *extra],
                                  ["y", "ok", "ov"], domain="com.microsoft", num_heads=H, kv_num_heads=H, **attrs))
    ins = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["B", "S"])]
    ins += [helper.make_tensor_value_info(x, f, ["B", "S", H * hs]) for x in "qkv"]
    ins += [helper.make_tensor_value_info(x, f, ["B", H, "M", hs]) for x in ("pk", "pv")]
    ins += [helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])]
    outs = [helper.make_tensor_value_info(x, f, None) for x in ("y", "ok", "ov")]
    g = helper.make_graph(nodes, "attn", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_positions_are_the_ones_the_attention_op_uses(interleaved):
    """graphs/rotary.py's positions, derived from seqlens_k / total_sequence_length, against the
    attention op's own rotary (the oracle: ONNX Runtime's GroupQueryAttention on whole heads):
    a right-padded first prompt of two rows, lock-step decode at two lengths, and a batch-1 prompt
    chunk after a past. Same outputs and same cache, step after step."""
    H, hs, M = 2, 16, 32
    sessions = [ort.InferenceSession(_attention_graph(H, hs, M, interleaved, in_op), providers=["CPUExecutionProvider"])
                for in_op in (True, False)]
    rng = np.random.default_rng(7)

    def run(caches, S, B, seqlens, total):
        feed = {x: rng.standard_normal((B, S, H * hs)).astype(np.float32) for x in "qkv"}
        feed.update({INPUT_IDS: np.zeros((B, S), np.int64), SEQLENS_K: np.asarray(seqlens, np.int32),
                     TOTAL_SEQUENCE_LENGTH: np.asarray(total, np.int32)})
        outs = []
        for sess, (pk, pv) in zip(sessions, caches):
            y, ok, ov = sess.run(None, {**feed, "pk": pk, "pv": pv})
            outs.append(y)
            pk[...], pv[...] = ok, ov  # shared-buffer protocol by copy (present has the buffer's length)
        return outs

    caches = [[np.zeros((2, H, M, hs), np.float32) for _ in range(2)] for _ in sessions]
    lens = [3, 6]
    a, b = run(caches, 6, 2, [n - 1 for n in lens], 6)  # first prompt, row 0 right-padded
    for r, n in enumerate(lens):
        np.testing.assert_allclose(b[r, :n], a[r, :n], atol=1e-5)
    for _ in range(3):  # decode, each row at its own length
        a, b = run(caches, 1, 2, lens, max(lens) + 1)
        np.testing.assert_allclose(b, a, atol=1e-5)
        lens = [n + 1 for n in lens]
    (ak, av), (bk, bv) = caches
    for r, n in enumerate(lens):
        np.testing.assert_allclose(bk[r, :, :n], ak[r, :, :n], atol=1e-5)
        np.testing.assert_allclose(bv[r, :, :n], av[r, :, :n], atol=1e-5)
    solo = [[c[:1].copy() for c in cs] for cs in caches]  # row 0 alone: a chunk of 4 after its past
    a, b = run(solo, 4, 1, [lens[0] + 3], lens[0] + 4)
    np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_allclose(solo[1][0][:, :, :lens[0] + 4], solo[0][0][:, :, :lens[0] + 4], atol=1e-5)


@pytest.mark.parametrize("over", [dict(rotary_dim=8),  # the other two layouts in `make test-slow`
                                  pytest.param(dict(rotary_dim=4, rope_pairing="interleaved"), marks=pytest.mark.slow),
                                  pytest.param(dict(num_attention_heads=8), marks=pytest.mark.slow)])
def test_rotary_the_op_cannot_take_is_rotated_in_front_of_it(over, tmp_path, bvv241_dir):
    """Partial rotary (8 or 4 of 16 features) and whole heads of 8 (the op's rotary needs 16): the
    kv graph rotates with RotaryEmbedding before GroupQueryAttention (do_rotary=0), and computes
    what the torch reference computes (teacher forcing over a prompt and decode steps) and what
    model.onnx computes step by step."""
    from reference.checkpoint import load_model
    from reference.config import tiny_config
    from reference.factory import make_checkpoint

    cfg = tiny_config(**over)
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg, seed=4)
    from export.build import build

    folder = build(ckpt, tmp_path / "art", lift_mode="arith", verify=False, kv_graph=False, log=lambda m: None)
    write_kv_graph(folder)
    g = onnx.load(str(folder / KV_MODEL_FILE), load_external_data=False).graph
    rot = [n for n in g.node if n.op_type == "RotaryEmbedding"]
    assert len(rot) == 2 * cfg.num_hidden_layers
    assert {a.name: a.i for a in rot[0].attribute}["rotary_embedding_dim"] == cfg.rope_dim
    assert not any(a.name == "do_rotary" and a.i for n in g.node for a in n.attribute)
    layers, H, hs, max_len = _dims(folder)
    kv, spec = KVStepper(folder, layers, H, hs, max_len), SpecStepper(folder, layers, H, hs)
    prompt = _prompt(5)
    a, b = kv.step(prompt), spec.step(prompt)
    got, tokens = [a[0]], []
    for _ in range(12):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
        tokens.append(int(b[0, -1].argmax()))
        ids = np.array([[tokens[-1]]], np.int64)
        a, b = kv.step(ids), spec.step(ids)
        got.append(a[0])
    assert kv.shared
    seq = torch.tensor(np.concatenate([prompt[0], tokens]))[None]
    with torch.no_grad():
        ref, _ = load_model(ckpt)(seq, torch.ones_like(seq), torch.arange(seq.shape[1])[None], None)
    ref = ref[0].numpy()
    assert np.abs(np.concatenate(got) - ref).max() <= 1e-4 * np.abs(ref).max()
