"""float32 vs float16 KV cache in the shared-cache graph (model.kv.onnx), side by side, batch 1, 2 threads.

At context 900 an int8/int4 decode step reads as many cache bytes as weight bytes, so halving the
cache is the lever left for the decode@900 / decode@128 target. Writes `model.kv16.probe.onnx`
beside each cached artifact (a new file; the artifact's files stay as they are), then times both
graphs alternately in fresh subprocesses and compares their logits on one prompt.

    python benchmarks/probe_kvcache.py [--precisions int8 int4] [--steps 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "cache"
PROBE_FILE = "model.kv16.probe.onnx"


def worker(graph: Path, contexts: list[int], steps: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from runtime import interface as I

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
    s = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in s.get_inputs()}
    past = [n for n in ins if n.startswith("past_key_values")]
    dt = np.float16 if ins[past[0]].type == "tensor(float16)" else np.float32
    H, hs = ins[past[0]].shape[1], ins[past[0]].shape[3]
    outs = [o.name for o in s.get_outputs()]
    rng = np.random.default_rng(0)
    res: dict = {}
    for ctx in contexts:
        L = ctx + steps + 2
        bufs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, H, L, hs), dt)) for _ in past]
        b = s.io_binding()
        logits = np.empty((1, 1, 65536), np.float32)
        b.bind_output(I.LOGITS, "cpu", 0, np.float32, [1, 1, 65536], logits.ctypes.data)
        for n, v in zip(past, bufs):
            b.bind_ortvalue_input(n, v)
            b.bind_ortvalue_output(n.replace("past_key_values", "present"), v)
        ids = rng.integers(0, 65536, size=(1, ctx))
        seq, tot, keep = np.array([ctx - 1], np.int32), np.array(ctx, np.int32), np.array([1], np.int64)
        b.bind_cpu_input(I.INPUT_IDS, ids)
        b.bind_cpu_input(I.SEQLENS_K, seq)
        b.bind_cpu_input(I.TOTAL_SEQUENCE_LENGTH, tot)
        b.bind_ortvalue_input(I.LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(keep))
        s.run_with_iobinding(b)
        tok = np.zeros((1, 1), np.int64)
        b.bind_cpu_input(I.INPUT_IDS, tok)
        n = ctx
        t0 = None
        for k in range(steps + 1):
            if k == 1:
                t0 = time.perf_counter()
            tok[0, 0] = int(logits[0, 0].argmax())
            seq[0], tot[()] = n, n + 1
            s.run_with_iobinding(b)
            n += 1
        res[f"decode_{ctx}_tok_s"] = steps / (time.perf_counter() - t0)
    # quality: all-position logits of one 128-token prompt (compared across graphs by the driver)
    ids = np.random.default_rng(1).integers(0, 65536, size=(1, 128))
    feed = {I.INPUT_IDS: ids, I.SEQLENS_K: np.array([127], np.int32), I.TOTAL_SEQUENCE_LENGTH: np.array(128, np.int32),
            **{n: np.zeros((1, H, 128, hs), dt) for n in past}}
    np.save(str(graph) + ".logits.npy", s.run([I.LOGITS], feed)[0][0])
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", nargs="*", default=["int8", "int4"])
    p.add_argument("--contexts", nargs="*", type=int, default=[128, 900])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe_kvcache.json"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(Path(a.worker), a.contexts, a.steps)))
        return 0
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from graphs.gqa import write_kv_graph

    rows = []
    for prec in a.precisions:
        folder = CACHE / f"full-arith-{prec}"
        write_kv_graph(folder, out_name=PROBE_FILE, cache_dtype="float16")
        graphs = {"float32": folder / "model.kv.onnx", "float16": folder / PROBE_FILE}
        runs: dict = {k: [] for k in graphs}
        for _ in range(a.repeats):
            for k, g in graphs.items():
                r = subprocess.run([sys.executable, __file__, "--worker", str(g), "--steps", str(a.steps),
                                    "--contexts", *map(str, a.contexts)], capture_output=True, text=True, cwd=ROOT)
                if r.returncode:
                    raise SystemExit(r.stderr[-2000:])
                runs[k].append(json.loads(r.stdout.strip().splitlines()[-1]))
        l32 = np.load(str(graphs["float32"]) + ".logits.npy").astype(np.float64)
        l16 = np.load(str(graphs["float16"]) + ".logits.npy").astype(np.float64)

        def lsm(x):
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.exp(x).sum(-1, keepdims=True))

        kl = float((np.exp(lsm(l32)) * (lsm(l32) - lsm(l16))).sum(-1).mean())
        top1 = float((l32.argmax(-1) == l16.argmax(-1)).mean())
        for k in graphs:
            med = {m: statistics.median(r[m] for r in runs[k]) for m in runs[k][0]}
            c0, c1 = a.contexts[0], a.contexts[-1]
            rows.append({"precision": prec, "cache": k, **med, "ratio": med[f"decode_{c1}_tok_s"] / med[f"decode_{c0}_tok_s"],
                         "top1_vs_float32_cache": 1.0 if k == "float32" else top1,
                         "kl_vs_float32_cache": 0.0 if k == "float32" else kl})
        for f in (graphs["float16"], Path(str(graphs["float16"]) + ".logits.npy"), Path(str(graphs["float32"]) + ".logits.npy")):
            f.unlink(missing_ok=True)
    print(f"{'precision':<9} {'cache':<8} " + " ".join(f"{'decode@' + str(c):>11}" for c in a.contexts) + f" {'ratio':>6} {'top1':>6} {'KL':>9}")
    for r in rows:
        print(f"{r['precision']:<9} {r['cache']:<8} " + " ".join(f"{r[f'decode_{c}_tok_s']:>11.1f}" for c in a.contexts)
              + f" {r['ratio']:>6.2f} {r['top1_vs_float32_cache']:>6.3f} {r['kl_vs_float32_cache']:>9.2e}")
    Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
