"""CUDA against the CPU on the demo model: no node on the CPU provider, the same logits and tokens.

The oracle is the same artifact run by ONNX Runtime's CPU provider (itself held to the PyTorch
reference by the parity gate). Each lift mode with CUDA kernels (`arith`, `lookup`) is exported
here from models/shakespeare with `provider="cuda"`, so the build's own parity gate also runs on
CUDA. Checks: the gate passed on CUDAExecutionProvider; the runtime's CUDA session disables CPU
fallback and a profiled Run places every node on CUDA; left-padded batch logits within 1e-4 of
max|logit| of the CPU's (also with TF32 off, to tell TF32 rounding from a real error); 64 greedy
tokens equal the CPU's; a batch gives each row what it gives alone; forcing model.kv.onnx on CUDA
either runs and matches the CPU or is refused with one readable runtime error (never an ORT crash).

Marked `cuda`; every test skips where onnxruntime has no CUDAExecutionProvider (install
onnxruntime-gpu on a machine with an NVIDIA GPU: `pip install 'tablefree-onnx[gpu]'`, never beside
the CPU wheel). Run them alone with `pytest -m cuda`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
DEMO = Path(__file__).resolve().parent.parent / "models" / "shakespeare"
PROMPTS = ["A", "First Citizen:", "Before we proceed any further, hear me speak.", "All: Speak, speak."]
REL_TOL = 1e-4  # the gate's fp32 bound (docs/parity.md), relative to the largest |logit|
GREEDY = 64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(CUDA_EP not in ort.get_available_providers(),
                       reason=f"onnxruntime {ort.__version__} has no {CUDA_EP} (it has "
                              f"{', '.join(ort.get_available_providers())}); CUDA checks need onnxruntime-gpu "
                              "and an NVIDIA GPU"),
]


@pytest.fixture(scope="module", params=["arith", "lookup"])
def artifact(request, tmp_path_factory) -> Path:
    """The demo model exported for CUDA (its parity gate runs on CUDA when the provider is there)."""
    from export.build import build

    out = tmp_path_factory.mktemp(f"cuda-{request.param}") / "artifact"
    return build(DEMO, out, lift_mode=request.param, provider="cuda", log=lambda msg: None)


@pytest.fixture(scope="module")
def models(artifact):
    """(cpu, cuda) runtime models of the same artifact."""
    import runtime

    return runtime.load(artifact, provider="cpu"), runtime.load(artifact, provider="cuda")


def _session(path: Path, tf32: bool = True, profile_dir: Path | None = None):
    """A CUDA-only session with CPU fallback disabled (as the runtime opens it)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / "prof")
    opts = {} if tf32 else {"use_tf32": "0"}
    return ort.InferenceSession(str(path), so, providers=[(CUDA_EP, opts)])


def _forward(sess, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """model.onnx's logits for a left-padded batch and an empty cache, through a bare session."""
    feed = {"input_ids": ids, "attention_mask": mask,
            "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            _, heads, _, head_size = inp.shape
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            feed[inp.name] = np.zeros((ids.shape[0], heads, 0, head_size), dtype)
    return sess.run(["logits"], feed)[0].astype(np.float32)


def _left_padded(m) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    rows = [m.encode(p) for p in PROMPTS]
    S = max(map(len, rows))
    ids = np.full((len(rows), S), m.pad_token_id, np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    for i, r in enumerate(rows):
        ids[i, S - len(r):], mask[i, S - len(r):] = r, 1
    return rows, ids, mask


def _rel_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(a - b)[real].max() / np.abs(a[real]).max())


def test_parity_gate_ran_on_cuda(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    assert manifest["parity"]["provider"] == CUDA_EP
    assert manifest["providers_verified"] == [CUDA_EP]


def test_cuda_session_has_no_cpu_fallback(models, artifact, tmp_path):
    _, gpu = models
    assert gpu.provider == CUDA_EP
    assert gpu.session.get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    # every node of a profiled Run on the CUDA provider (the profile names each node's provider)
    sess = _session(artifact / "model.onnx", profile_dir=tmp_path)
    _, ids, mask = _left_padded(gpu)
    _forward(sess, ids, mask)
    events = json.loads(Path(sess.end_profiling()).read_text())
    placed: dict[str, str] = {}
    for ev in events:
        if ev.get("cat") == "Node" and "provider" in ev.get("args", {}):
            node = ev["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
            placed[node] = ev["args"]["provider"]
    assert placed, "the profile recorded no node"
    elsewhere = {n: p for n, p in placed.items() if p != CUDA_EP}
    assert not elsewhere, f"nodes off CUDA: {dict(list(elsewhere.items())[:5])}"


@pytest.mark.parametrize("tf32", [True, False], ids=["tf32-default", "tf32-off"])
def test_logits_match_cpu(models, artifact, tf32):
    cpu, gpu = models
    _, ids, mask = _left_padded(gpu)
    want = cpu.forward(ids, mask).logits
    if tf32:
        got = gpu.forward(ids, mask).logits
    else:
        try:
            sess = _session(artifact / "model.onnx", tf32=False)
        except Exception as e:  # an onnxruntime-gpu without the use_tf32 provider option
            pytest.skip(f"this onnxruntime's CUDA provider does not take use_tf32 ({str(e).splitlines()[0][:100]})")
        got = _forward(sess, ids, mask)
    assert _rel_diff(want, got, mask) <= REL_TOL


def test_greedy_tokens_match_cpu(models):
    cpu, gpu = models
    prompt = cpu.encode(PROMPTS[2])
    n = min(GREEDY, cpu.context_length - len(prompt))
    assert gpu.generate(prompt, max_new_tokens=n).ids == cpu.generate(prompt, max_new_tokens=n).ids


def test_cuda_batch_equals_rows_alone(models):
    _, gpu = models
    rows = [gpu.encode(p) for p in PROMPTS]
    batch = gpu.generate(rows, max_new_tokens=24)
    alone = [gpu.generate(r, max_new_tokens=24).ids for r in rows]
    assert [b.ids for b in batch] == alone


def test_kv_graph_on_cuda_runs_or_is_refused_cleanly(models, artifact):
    """ONNX Runtime's CUDA GroupQueryAttention takes float16/bfloat16; the kv graph is float32. Forcing
    it must either compute what the CPU computes or fail with the runtime's own one-line error."""
    import runtime

    cpu, _ = models
    prompt = cpu.encode(PROMPTS[2])
    try:
        kv = runtime.load(artifact, provider="cuda", graph="kv")
    except runtime.TableFreeRuntimeError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert kv.provider == CUDA_EP
    assert kv.generate(prompt, max_new_tokens=32).ids == cpu.generate(prompt, max_new_tokens=32).ids


@pytest.fixture(scope="module")
def fp16_artifact(tmp_path_factory) -> Path:
    """The fp16 demo export for CUDA: the one kind whose model.kv.onnx the runtime opens on CUDA."""
    from export.build import build

    out = tmp_path_factory.mktemp("cuda-fp16") / "artifact"
    return build(DEMO, out, lift_mode="arith", precision="fp16", provider="cuda", log=lambda msg: None)


def test_server_slots_keep_the_cache_on_cuda(fp16_artifact):
    """The server's shared cache as CUDA OrtValues (runtime/serve/slots.py): greedy tokens equal the CPU's."""
    import runtime
    from runtime.serve.slots import SlotCache

    gpu, cpu = runtime.load(fp16_artifact, provider="cuda"), runtime.load(fp16_artifact, provider="cpu")
    slots = {"cuda": SlotCache.from_model(gpu, 2, 96), "cpu": SlotCache.from_model(cpu, 2, 96)}
    assert slots["cuda"].device == "cuda" and slots["cpu"].device == "cpu"
    tokens = {}
    for dev, s in slots.items():
        last = s.prefill(0, cpu.encode(PROMPTS[1]))
        got = [int(np.argmax(last))]
        for _ in range(8):
            got.append(int(np.argmax(s.step(np.array([got[-1]], np.int64))[0])))
        tokens[dev] = got
    assert tokens["cuda"] == tokens["cpu"]
