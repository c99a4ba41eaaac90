"""Side-by-side probes of graph variants and session options (the evidence behind RESULTS.md).

bench.py times finished, gated artifacts through the runtime; this times a bare model.onnx under
given session options, so quantization settings and ORT options can be compared in one run
without an export + parity gate each. Every probe runs in a fresh subprocess (own RSS, own load).

    python benchmarks/probe.py quantize --src benchmarks/cache/full-arith-fp32 --bits 4 --block 32 --out DIR
    python benchmarks/probe.py time DIR1/model.onnx DIR2/model.onnx --opt session.disable_prepacking=1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(a: argparse.Namespace) -> dict:
    """Load, prefill a prompt (last-position head when the graph has it), decode `steps` tokens at ctx."""
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from runtime.interface import LOGITS_TO_KEEP, input_names, output_names

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, a.level)
    for kv in a.opt:
        k, v = kv.split("=", 1)
        so.add_session_config_entry(k, v)
    if a.save_optimized:
        so.optimized_model_filepath = a.save_optimized
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(a.save_optimized).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    t0 = time.perf_counter()
    s = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    out = {"model": a.model, "opts": a.opt, "level": a.level, "load_s": load_s, "rss_after_load": peak_rss()}
    L = sum(1 for i in s.get_inputs() if i.name.endswith(".key"))
    past = [i for i in s.get_inputs() if i.name.startswith("past_key_values")]
    H, hs = past[0].shape[1], past[0].shape[3]
    dt = np.float16 if past[0].type == "tensor(float16)" else np.float32
    has_keep = LOGITS_TO_KEEP in {i.name for i in s.get_overridable_initializers()}
    ins, outs = input_names(L), output_names(L)
    rng = np.random.default_rng(0)

    def run(ids, P, past_vals, keep):
        b = s.io_binding()
        S = ids.shape[1]
        b.bind_cpu_input(ins[0], ids)
        b.bind_cpu_input(ins[1], np.ones((1, P + S), np.int64))
        b.bind_cpu_input(ins[2], np.arange(P, P + S, dtype=np.int64)[None])
        if keep and has_keep:
            b.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array([keep], np.int64)))
        for n, v in zip(ins[3:], past_vals):
            b.bind_ortvalue_input(n, v)
        b.bind_output(outs[0], "cpu")
        for n in outs[1:]:
            b.bind_output(n, "cpu")
        s.run_with_iobinding(b)
        o = b.get_outputs()
        return o[0].numpy(), o[1:]

    empty = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, H, 0, hs), dt)) for _ in ins[3:]]
    for n in a.prefill:
        ids = rng.integers(0, 50000, size=(1, n)).astype(np.int64)
        run(ids[:, :8], 0, empty, 1)
        t0 = time.perf_counter()
        lg, _ = run(ids, 0, empty, 1)
        out["prefill_logits_rows"] = int(lg.shape[1])
        out[f"prefill_{n}_tok_s"] = n / (time.perf_counter() - t0)
    for ctx in a.contexts:
        ids = rng.integers(0, 50000, size=(1, ctx)).astype(np.int64)
        logits, pv = run(ids, 0, empty, 1)
        tok = logits[:, -1:].argmax(-1).astype(np.int64)
        logits, pv = run(tok, ctx, pv, 0)
        t0 = time.perf_counter()
        for k in range(a.steps):
            tok = logits[:, -1:].argmax(-1).astype(np.int64)
            logits, pv = run(tok, ctx + 1 + k, pv, 0)
        out[f"decode_{ctx}_tok_s"] = a.steps / (time.perf_counter() - t0)
    out["peak_rss"] = peak_rss()
    return out


def quantize(a: argparse.Namespace) -> None:
    """A variant of the fp32 artifact's graph (no gate: probes only; the exporter gates what ships)."""
    sys.path.insert(0, str(ROOT))
    from graphs import quantize as q

    src = Path(a.src) / "model.onnx"
    out = Path(a.out) / "model.onnx"
    t0 = time.perf_counter()
    if a.bits == 8 and a.dynamic:
        info = q.quantize_int8(src, out, weight_type=a.weight_type, per_channel=a.per_channel)
    else:
        info = q.quantize_nbits(src, out, bits=a.bits, block_size=a.block, accuracy_level=a.acc)
    print(json.dumps({**info, "seconds": time.perf_counter() - t0}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("models", nargs="+")
    t.add_argument("--opt", action="append", default=[], help="session config entry key=value (repeatable)")
    t.add_argument("--level", default="ORT_ENABLE_ALL")
    t.add_argument("--steps", type=int, default=16)
    t.add_argument("--contexts", nargs="*", type=int, default=[128])
    t.add_argument("--prefill", nargs="*", type=int, default=[128])
    t.add_argument("--save-optimized", default=None)
    t.add_argument("--worker", action="store_true")
    qp = sub.add_parser("quantize")
    qp.add_argument("--src", required=True)
    qp.add_argument("--out", required=True)
    qp.add_argument("--bits", type=int, default=4)
    qp.add_argument("--block", type=int, default=32)
    qp.add_argument("--acc", type=int, default=4)
    qp.add_argument("--dynamic", action="store_true", help="bits 8: QDynamic (DynamicQuantizeLinear + MatMulInteger)")
    qp.add_argument("--weight-type", default="QUInt8")
    qp.add_argument("--per-channel", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "quantize":
        quantize(a)
        return 0
    if a.worker:
        a.model = a.models[0]
        print(json.dumps(worker(a)))
        return 0
    for m in a.models:
        cmd = [sys.executable, __file__, "time", m, "--worker", "--level", a.level, "--steps", str(a.steps),
               "--contexts", *map(str, a.contexts), "--prefill", *map(str, a.prefill)]
        for o in a.opt:
            cmd += ["--opt", o]
        if a.save_optimized:
            cmd += ["--save-optimized", a.save_optimized]
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            print(json.dumps({"model": m, "error": r.stderr[-1500:]}))
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}
        for k in ("rss_after_load", "peak_rss"):
            res[k] = round(res[k] / 1e9, 3)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
