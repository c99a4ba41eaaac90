"""The exporter end to end on the tiny checkpoint: every lift mode passes the parity gate, the gate
can fail, the artifact's lift equals a numpy re-implementation of SPEC 1.1 for all V ids, the
artifact runs with onnxruntime alone (torch unimportable), and the manifest describes the folder.

Oracles are independent of the exporter: the PyTorch reference (`reference.checkpoint.load_model`),
a numpy lift written here from the SPEC text, and hashlib over the files.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from runtime import interface as I

ROOT = Path(__file__).resolve().parent.parent
MODES = I.LIFT_MODES


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    from reference.checkpoint import load_model

    return load_model(tiny_ckpt)


def numpy_lift(ids: np.ndarray, cfg: dict, width: int) -> np.ndarray:
    """SPEC 1.1 step by step, from config.json alone: bits, affine recode over GF(2), values, tiling."""
    code = cfg["code"]
    K = code["bits"]
    A, b = np.array(code["A"], np.int64), np.array(code["b"], np.int64)
    shifts = np.arange(K) if code["bit_order"] == "lsb_first" else np.arange(K)[::-1]
    bits = (ids[..., None] >> shifts) & 1
    rec = (bits @ A.T + b) % 2
    v = rec.astype(np.float32) if code["values"] == "zero_one" else 2.0 * rec.astype(np.float32) - 1.0
    v = v * np.float32(code["scale"])
    reps = width // K
    return np.tile(v, reps) if code["tiling"] == "repeat" else np.repeat(v, reps, axis=-1)


def session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / I.MODEL_FILE), providers=["CPUExecutionProvider"])


def run(sess, ids, mask, pos, past):
    feed = {I.INPUT_IDS: ids, I.ATTENTION_MASK: mask, I.POSITION_IDS: pos}
    L = len(past) // 2
    feed.update(zip(I.past_names(L), past))
    out = sess.run(None, feed)
    return out[0], out[1:]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_passes_gate_and_matches_reference(tiny_artifacts, ref, mode):
    folder = tiny_artifacts(mode)
    manifest = json.loads((folder / I.MANIFEST_FILE).read_text())
    assert manifest["parity"]["passed"] is True
    assert all(c["passed"] for c in manifest["parity"]["checks"])
    assert manifest["providers_verified"] == ["CPUExecutionProvider"]

    # Independent of the gate: prefill (past 0) of batch 2 x 5, then a chunk of 3 with past 5.
    cfg = ref.cfg
    rng = np.random.default_rng(7)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 8)).astype(np.int64)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))[0].numpy()
    sess = session(folder)
    H, hs, L = cfg.num_attention_heads, cfg.head_size, cfg.num_hidden_layers
    empty = [np.zeros((2, H, 0, hs), np.float32) for _ in range(2 * L)]
    pos = np.tile(np.arange(8), (2, 1)).astype(np.int64)
    mask = np.ones((2, 8), np.int64)
    l1, past = run(sess, ids[:, :5], mask[:, :5], pos[:, :5], empty)
    l2, present = run(sess, ids[:, 5:], mask, pos[:, 5:], past)
    assert present[0].shape == (2, H, 8, hs)
    got = np.concatenate([l1, l2], axis=1)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("mode", MODES)
def test_exhaustive_lift_equals_spec(tiny_artifacts, tmp_path, mode):
    """Cut input_ids -> inputs_embeds out of the saved graph with onnx.utils and run all V ids."""
    folder = tiny_artifacts(mode)
    cfg = json.loads((folder / I.CONFIG_FILE).read_text())
    V, d = cfg["vocab_size"], cfg["hidden_size"]
    sub = tmp_path / "lift.onnx"
    onnx.utils.extract_model(str(folder / I.MODEL_FILE), str(sub), [I.INPUT_IDS], ["inputs_embeds"])
    sess = ort.InferenceSession(str(sub), providers=["CPUExecutionProvider"])
    ids = np.arange(V, dtype=np.int64).reshape(64, V // 64)
    got = sess.run(None, {I.INPUT_IDS: ids})[0]
    want = numpy_lift(ids, cfg, d)
    assert got.shape == (64, V // 64, d)
    assert np.array_equal(got, want)
    # The code is injective: all V inputs differ (so the graph cannot be a lossy stand-in).
    assert len(np.unique(got.reshape(V, d)[:, : cfg["code"]["bits"]], axis=0)) == V


def test_gate_fails_on_wrong_b(tiny_ckpt, tmp_path):
    """A graph whose lift uses a different b than the checkpoint must be refused, readably, and parked."""
    from export.build import build
    from export.errors import ExportError
    from reference.checkpoint import load_checkpoint

    cfg, _ = load_checkpoint(tiny_ckpt)
    wrong = type(cfg.code)(**{**cfg.code.to_dict(with_matrix=False), "A": cfg.code.A, "b": cfg.code.b ^ 1})
    out = tmp_path / "broken"
    lines: list[str] = []
    with pytest.raises(ExportError) as err:
        build(tiny_ckpt, out, lift_mode="arith", log=lines.append, _lift_code=wrong)
    msg = str(err.value)
    assert "parity gate failed" in msg and "lift exhaustive" in msg and ".failed" in msg
    assert not out.exists()
    failed = out.with_name("broken.failed")
    report = json.loads((failed / I.MANIFEST_FILE).read_text())["parity"]
    assert report["passed"] is False
    by_name = {c["name"]: c for c in report["checks"]}
    assert not by_name["lift exhaustive (all V ids)"]["passed"]
    assert not by_name["logits max|diff| (batch 2 x 12)"]["passed"]
    table = "\n".join(lines)
    assert "FAIL" in table and "parity gate (fp32, CPUExecutionProvider): FAILED" in table
    assert not list(tmp_path.glob(".broken.*"))  # no temp folders left behind


NO_TORCH = textwrap.dedent("""
    import sys, json
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process")
    sys.meta_path.insert(0, Block())
    try:
        import torch
        raise SystemExit("torch imported")
    except ImportError:
        pass
    import numpy as np, onnxruntime as ort
    folder, out = sys.argv[1], sys.argv[2]
    cfg = json.load(open(folder + "/config.json"))
    L, H, hs = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    s = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
    names = {"in": [i.name for i in s.get_inputs()], "out": [o.name for o in s.get_outputs()],
             "in_types": [i.type for i in s.get_inputs()]}
    ids = np.array([[5, 104, 65535, 57345]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones((1, 4), np.int64), "position_ids": np.arange(4)[None]}
    feed.update({n: np.zeros((1, H, 0, hs), np.float32) for n in names["in"][3:]})
    logits = s.run(["logits"], feed)[0]
    np.save(out, logits)
    names["torch_loaded"] = "torch" in sys.modules
    print(json.dumps(names))
""")


def test_runs_with_onnxruntime_alone(tiny_artifacts, ref, tmp_path):
    folder = tiny_artifacts("bitwise")
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    out = tmp_path / "logits.npy"
    res = subprocess.run([sys.executable, str(script), str(folder), str(out)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    L = ref.cfg.num_hidden_layers
    assert info["in"] == I.input_names(L)
    assert info["out"] == I.output_names(L)
    assert info["in_types"][:3] == ["tensor(int64)"] * 3
    assert info["torch_loaded"] is False
    with torch.no_grad():
        want = ref(torch.tensor([[5, 104, 65535, 57345]]))[0].numpy()
    got = np.load(out)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_manifest_and_files(tiny_artifacts, tiny_ckpt):
    folder = tiny_artifacts("bitwise")
    m = json.loads((folder / I.MANIFEST_FILE).read_text())
    assert m["format"] == I.FORMAT_NAME and m["format_version"] == I.FORMAT_VERSION
    files = {p.name for p in folder.iterdir()} - {I.MANIFEST_FILE}
    assert set(m["files"]) == files
    for name, entry in m["files"].items():
        data = (folder / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert entry["size"] == len(data)
    for name in (I.MODEL_FILE, I.DATA_FILE, I.CONFIG_FILE, I.GENERATION_CONFIG_FILE, I.GENAI_CONFIG_FILE,
                 *I.TOKENIZER_FILES):
        assert name in files, name
    src = m["source"]["files"]["model.safetensors"]["sha256"]
    assert src == hashlib.sha256((tiny_ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert m["precision"] == "fp32" and m["opset"] == 21 and m["lift"]["mode"] == "bitwise"
    cfg = json.loads((folder / I.CONFIG_FILE).read_text())
    assert m["lift"]["A"] == cfg["code"]["A"] and m["lift"]["b"] == cfg["code"]["b"]
    assert any(cfg["code"]["b"]) and cfg["code"]["A"] != np.eye(16, dtype=int).tolist()  # the fixture's real recoding


def test_graph_shape_names_and_weights(tiny_artifacts):
    folder = tiny_artifacts("lookup")
    model = onnx.load(str(folder / I.MODEL_FILE), load_external_data=False)
    cfg = json.loads((folder / I.CONFIG_FILE).read_text())
    V, d = cfg["vocab_size"], cfg["hidden_size"]
    names = {n.name for n in model.graph.node}
    assert len(names) == len(model.graph.node)  # unique
    last = cfg["num_hidden_layers"] - 1
    for expected in (f"/model/layers.{last}/attn/q_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul",
                     "/model/layers.0/ln1/LayerNormalization", "/model/lm_head/MatMul"):
        assert expected in names, expected
    # every large float weight lives in the one external data file (the lift's small integer constants may not)
    big = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {I.DATA_FILE}
    # every initializer is read (a leftover one makes ONNX Runtime warn at each load); logits_to_keep is an input
    read = {i for n in model.graph.node for i in n.input}
    assert [t.name for t in model.graph.initializer if t.name not in read and t.name != I.LOGITS_TO_KEEP] == []
    # no float table is gathered by token id: no Gather reads a float constant with V rows
    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in consts:
            t = consts[n.input[0]]
            assert not (t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and V in t.dims), n.name
    # dynamic batch / seq / past axes
    dims = {i.name: [x.dim_param or x.dim_value for x in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert all(isinstance(x, str) for x in dims[I.INPUT_IDS])
    k = dims[I.PAST_KEY.format(i=0)]
    assert isinstance(k[0], str) and isinstance(k[2], str) and k[1] == cfg["num_attention_heads"]
    assert d == cfg["num_attention_heads"] * k[3]


def test_genai_config_names_the_graph(tiny_artifacts):
    folder = tiny_artifacts("bitwise")
    g = json.loads((folder / I.GENAI_CONFIG_FILE).read_text())["model"]
    cfg = json.loads((folder / I.CONFIG_FILE).read_text())
    dec = g["decoder"]
    # with the kv graph (the default), genai runs its variant of it, with one shared buffer per layer
    assert dec["filename"] == "model.genai.onnx" and json.loads((folder / I.GENAI_CONFIG_FILE).read_text())[
        "search"]["past_present_share_buffer"] is True
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / dec["filename"]), providers=["CPUExecutionProvider"])
    ins = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    assert ins[:2] == [dec["inputs"]["input_ids"], dec["inputs"]["attention_mask"]]  # no seqlens_k: genai feeds the mask
    assert g["type"] == "decoder" and g["vocab_size"] == cfg["vocab_size"]
    assert dec["inputs"]["past_key_names"] % 1 in ins and dec["inputs"]["past_value_names"] % 0 in ins
    assert dec["outputs"]["present_key_names"] % 1 in outs and dec["outputs"]["logits"] in outs
    assert dec["head_size"] * dec["num_attention_heads"] == dec["hidden_size"] == cfg["hidden_size"]
    assert dec["num_hidden_layers"] == cfg["num_hidden_layers"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_builds_meet_floors(tiny_artifacts, ref, precision):
    pytest.importorskip("graphs.quantize")
    from export.floors import FLOORS

    folder = tiny_artifacts("arith", precision)
    report = json.loads((folder / I.MANIFEST_FILE).read_text())["parity"]
    assert report["passed"] and report["precision"] == precision
    # recompute top-1 agreement independently on a fresh batch
    rng = np.random.default_rng(3)
    ids = rng.integers(0, ref.cfg.vocab_size, size=(1, 32)).astype(np.int64)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))[0].numpy()
    L, H, hs = ref.cfg.num_hidden_layers, ref.cfg.num_attention_heads, ref.cfg.head_size
    got, _ = run(session(folder), ids, np.ones_like(ids), np.arange(32)[None],
                 [np.zeros((1, H, 0, hs), np.float32) for _ in range(2 * L)])
    assert got.shape == want.shape
    assert np.abs(got - want).max() < np.abs(want).max()  # close, not garbage
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= FLOORS[precision]["top1"] - 0.25
    size = (folder / I.DATA_FILE).stat().st_size
    assert size < (tiny_artifacts("arith") / I.DATA_FILE).stat().st_size


def test_fp16_builds_and_runs_on_cpu(tiny_artifacts, ref):
    """fp16 is meant for CUDA; ORT's CPU provider runs it too, so the build is gated here on CPU."""
    pytest.importorskip("graphs.quantize")
    folder = tiny_artifacts("arith", "fp16")
    m = json.loads((folder / I.MANIFEST_FILE).read_text())
    assert m["precision"] == "fp16" and m["parity"]["passed"] is True
    sess = session(folder)
    types = {i.name: i.type for i in sess.get_inputs()}
    kv = np.float16 if types[I.PAST_KEY.format(i=0)] == "tensor(float16)" else np.float32
    L, H, hs = ref.cfg.num_hidden_layers, ref.cfg.num_attention_heads, ref.cfg.head_size
    ids = np.array([[1, 2, 3, 60000]], np.int64)
    got, _ = run(sess, ids, np.ones_like(ids), np.arange(4)[None], [np.zeros((1, H, 0, hs), kv) for _ in range(2 * L)])
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))[0].numpy()
    assert np.abs(got.astype(np.float32) - want).max() <= 1e-2 * np.abs(want).max()
    assert (folder / I.DATA_FILE).stat().st_size < 0.6 * (tiny_artifacts("arith") / I.DATA_FILE).stat().st_size
