"""CUDA check for a machine with an NVIDIA GPU and onnxruntime-gpu: parity with the CPU and no CPU fallback.

    python benchmarks/cuda_check.py [--model ARTIFACT_DIR] [--out results.json]

Without --model it exports a tiny arith-mode artifact (needs torch and the exporter; arith is the
lift mode with kernels on every provider). Checks, printed as a table (exit 0 only if all pass):
  providers      runtime.load(provider="cuda") really got CUDAExecutionProvider
  no fallback    the session was created with session.disable_cpu_ep_fallback=1, and a profiled
                 Run places every node on the CUDA provider (counts per provider from the profile)
  logits         CUDA vs CPU logits of a left-padded prompt batch, max|diff| / max|logit| <= 1e-4
                 (also with TF32 turned off, to tell TF32 rounding from a real error)
  greedy         64 greedy tokens on CUDA == on CPU; a 4-prompt batch on CUDA == each row alone
  kv graph       whether model.kv.onnx (float32 GroupQueryAttention) can run on CUDA (information only;
                 the runtime serves model.onnx on CUDA)
  speed          decode ms/token on CUDA and on CPU (information only)
On a machine without CUDA it prints one line saying what is missing and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
PROMPTS = ["A", "First Citizen:", "Before we proceed any further, hear me speak.", "All: Speak, speak."]


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"cuda_check: {msg}", file=sys.stderr)
    raise SystemExit(2)


def tiny_arith(work: Path) -> Path:
    try:
        from export.build import build
        from reference.config import CodeConfig, tiny_config
        from reference.factory import make_checkpoint
        from reference.lift import random_invertible_gf2
    except ImportError as e:
        fail(f"no --model given and the exporter cannot be imported ({e}); pass --model ARTIFACT_DIR")
    A, b = random_invertible_gf2(16, seed=1)
    tok = None
    try:
        from reference.tokenizer import build_bvv241, save_tokenizer

        tok = work / "tok"
        save_tokenizer(build_bvv241(), tok)
    except Exception as e:  # the shared n-gram file may be absent: ids still work
        print(f"cuda_check: no tokenizer ({e}); prompts are used as code points", file=sys.stderr)
        tok = None
    ckpt = make_checkpoint(work / "ckpt", tiny_config(code=CodeConfig(A=A, b=b)), seed=0, tokenizer_dir=tok)
    return build(ckpt, work / "tiny-arith", lift_mode="arith", provider="cuda", log=lambda m: None)


def node_placement(model_path: Path, m, ort) -> dict[str, int]:
    """Run once with profiling on, fallback disabled; count nodes per provider from the profile."""
    so = ort.SessionOptions()
    if CUDA_EP != CPU_EP:  # (ORT refuses the flag when the CPU provider is the one asked for)
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as d:
        so.profile_file_prefix = str(Path(d) / "prof")
        sess = ort.InferenceSession(str(model_path), so, providers=[CUDA_EP])
        feed = {"input_ids": np.array([[1, 2, 3]], np.int64), "attention_mask": np.ones((1, 3), np.int64),
                "position_ids": np.arange(3, dtype=np.int64)[None]}
        z = np.zeros((1, m.num_heads, 0, m.head_size), m.past_dtype)
        for i in range(m.num_layers):
            feed[f"past_key_values.{i}.key"] = z
            feed[f"past_key_values.{i}.value"] = z
        sess.run(None, feed)
        prof = sess.end_profiling()
        events = json.loads(Path(prof).read_text())
    counts: dict[str, int] = {}
    seen = set()
    for ev in events:
        if ev.get("cat") == "Node" and "provider" in ev.get("args", {}):
            name = ev["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
            if name in seen:
                continue
            seen.add(name)
            counts[ev["args"]["provider"]] = counts.get(ev["args"]["provider"], 0) + 1
    return counts


def decode_ms(m, steps: int = 48) -> float:
    prompt = list(range(65, 73))
    m.generate(prompt, max_new_tokens=4)
    t0 = time.perf_counter()
    r = m.generate(prompt, max_new_tokens=steps, min_new_tokens=steps)
    return 1e3 * (time.perf_counter() - t0) / len(r.ids)


def main() -> int:
    ap = argparse.ArgumentParser(description="CUDA parity and no-fallback check (needs onnxruntime-gpu and a GPU)")
    ap.add_argument("--model", type=Path, help="artifact folder (default: export a tiny arith one)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="exercise this script on a CPU-only machine (CPU stands in for CUDA; proves nothing about CUDA)")
    args = ap.parse_args()
    global CUDA_EP
    if args.cpu_dry_run:
        CUDA_EP = CPU_EP
    try:
        import onnxruntime as ort
    except ImportError:
        fail("onnxruntime is not installed; pip install 'tablefree-onnx[gpu]' (onnxruntime-gpu)")
    if CUDA_EP not in ort.get_available_providers():
        fail(f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider (it has "
             f"{', '.join(ort.get_available_providers())}): run on a machine with an NVIDIA GPU and onnxruntime-gpu")
    import runtime

    tmp = tempfile.TemporaryDirectory()
    folder = args.model or tiny_arith(Path(tmp.name))
    rows: list[tuple[str, str, str, bool]] = []
    cpu = runtime.load(folder, provider="cpu")
    try:
        gpu = runtime.load(folder, provider="cpu" if args.cpu_dry_run else "cuda")
    except runtime.ProviderError as e:
        fail(str(e))
    rows.append(("provider", gpu.provider, CUDA_EP, gpu.provider == CUDA_EP))
    if not args.cpu_dry_run:
        fallback = gpu.session.get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback")
        rows.append(("session.disable_cpu_ep_fallback", fallback, "1", fallback == "1"))
    counts = node_placement(folder / "model.onnx", gpu, ort)
    rows.append(("nodes per provider (profile)", json.dumps(counts), f"all {CUDA_EP}",
                 bool(counts) and set(counts) == {CUDA_EP}))

    ids_rows = [gpu.encode(p) if gpu.tokenizer else [ord(c) for c in p] for p in PROMPTS]
    S = max(map(len, ids_rows))
    ids = np.full((4, S), gpu.pad_token_id, np.int64)
    mask = np.zeros((4, S), np.int64)
    for i, r in enumerate(ids_rows):
        ids[i, S - len(r):], mask[i, S - len(r):] = r, 1
    a = cpu.forward(ids, mask).logits
    b = gpu.forward(ids, mask).logits
    real = mask.astype(bool)
    rel = float(np.abs(a - b)[real].max() / np.abs(a[real]).max())
    rows.append(("logits max|diff|/max|logit|", f"{rel:.2e}", "<= 1e-4", rel <= 1e-4))
    try:
        so = ort.SessionOptions()
        if not args.cpu_dry_run:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        opts = {} if args.cpu_dry_run else {"use_tf32": "0"}
        s32 = ort.InferenceSession(str(folder / "model.onnx"), so, providers=[(CUDA_EP, opts)])
        gpu_f32 = runtime.Model(s32, gpu.info, gpu.tokenizer, ort, "cpu" if args.cpu_dry_run else "cuda")
        rel32 = float(np.abs(a - gpu_f32.forward(ids, mask).logits)[real].max() / np.abs(a[real]).max())
        rows.append(("logits, TF32 off", f"{rel32:.2e}", "<= 1e-4", rel32 <= 1e-4))
    except Exception as e:  # an onnxruntime without the use_tf32 option
        rows.append(("logits, TF32 off", f"n/a ({str(e).splitlines()[0][:60]})", "", True))

    n = min(64, gpu.context_length - S)
    g_cpu = cpu.generate(ids_rows[2], max_new_tokens=n).ids
    g_gpu = gpu.generate(ids_rows[2], max_new_tokens=n).ids
    same = next((i for i, (x, y) in enumerate(zip(g_cpu, g_gpu)) if x != y), len(g_gpu))
    rows.append(("greedy tokens CUDA == CPU", f"{same}/{len(g_cpu)}", "all", g_cpu == g_gpu))
    batch = gpu.generate(ids_rows, max_new_tokens=24)
    alone = [gpu.generate(r, max_new_tokens=24).ids for r in ids_rows]
    ok = sum(x.ids == y for x, y in zip(batch, alone))
    rows.append(("CUDA batch rows == alone", f"{ok}/4", "4/4", ok == 4))
    # the shared-cache graph is float32; ONNX Runtime's CUDA GroupQueryAttention is float16/bfloat16,
    # so runtime.load(provider="cuda") serves model.onnx. Recorded here: what forcing it does.
    try:
        kv = runtime.load(folder, provider="cpu" if args.cpu_dry_run else "cuda", graph="kv")
        g_kv = kv.generate(ids_rows[2], max_new_tokens=n).ids
        rows.append(("model.kv.onnx forced on CUDA (info)", f"runs; greedy == CPU: {g_kv == g_cpu}", "info", True))
    except Exception as e:  # expected without a float32 CUDA kernel: say what ORT said
        rows.append(("model.kv.onnx forced on CUDA (info)", f"refused: {str(e).splitlines()[0][:60]}", "info", True))
    ms_gpu, ms_cpu = decode_ms(gpu), decode_ms(cpu)
    rows.append(("decode ms/token CUDA | CPU", f"{ms_gpu:.3f} | {ms_cpu:.3f}", "info", True))

    w = max(len(r[0]) for r in rows)
    print(f"{'check':<{w}}  {'value':<40}  {'want':<24}  result")
    for name, value, want, passed in rows:
        print(f"{name:<{w}}  {value:<40}  {want:<24}  {'ok' if passed else 'FAIL'}")
    print(f"artifact {folder}  onnxruntime {ort.__version__}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"artifact": str(folder), "onnxruntime": ort.__version__,
                                        "rows": [dict(zip(("check", "value", "want", "passed"), r)) for r in rows]},
                                       indent=2))
    tmp.cleanup()
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sys.exit(main())
