"""`make bench`: the full-size model on this CPU, PyTorch eager against the ONNX runtime, side by side.

Why a driver and workers: every measurement runs in its own fresh process, so peak RSS and
session-load time belong to that measurement alone and one run's caches do not flatter the next.
The driver builds (and caches under benchmarks/cache/, gitignored) the full-size synthetic
checkpoint and its fp32 / int8 / int4 artifacts, each passing the exporter's parity gate, then
prints one table, writes JSON and a PNG chart to benchmarks/results/.

Decode is memory-bound: each new token reads every weight once, so the roofline is the machine's
read bandwidth divided by the weight bytes a token reads; the table reports % of it.

    python benchmarks/bench.py                 # everything (about 15-25 minutes on 2 cores)
    python benchmarks/bench.py --quick         # shorter runs, fewer contexts
    python benchmarks/bench.py --precisions fp32 --skip-torch
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import (CACHE, RESULTS, ROOT, THREADS, child_env, cpu_info, ensure_full_checkpoint, log, markdown_table,
                    peak_rss_bytes, run_json, weight_bytes, write_json)

CKPT = CACHE / "full-ckpt"
PRECISIONS = ("fp32", "int8", "int4")


# -- workers (run in a subprocess each) -----------------------------------------------------------

def worker_bandwidth(args: argparse.Namespace) -> dict:
    """Read bandwidth with THREADS threads over 1 GiB: the best of two readers, so the roofline is
    not flattered by a slow probe. (1) numpy float32 sums of disjoint halves (numpy drops the GIL;
    float64 sums measured 15% lower, so float32); (2) ONNX Runtime's own fp32 GEMV, [1, K] x [K, N]
    on a 1 GiB weight: the very kernel decode runs, which reads faster than numpy here."""
    import threading

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = (1 << 30) // 4
    a = np.ones(n, dtype=np.float32)
    parts = np.array_split(a, THREADS)
    numpy_best = 0.0
    for _ in range(5):
        threads = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        numpy_best = max(numpy_best, a.nbytes / (time.perf_counter() - t0))
    K, N = 4096, n // 4096
    w = a.reshape(K, N)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                          [numpy_helper.from_array(w, "w")])
    del a, parts
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    sess = ort.InferenceSession(onnx.helper.make_model(g).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.ones((1, K), np.float32)
    sess.run(None, {"x": x})
    gemv_best = 0.0
    for _ in range(8):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        gemv_best = max(gemv_best, w.nbytes / (time.perf_counter() - t0))
    return {"read_bandwidth_Bps": max(numpy_best, gemv_best), "numpy_f32_sum_Bps": numpy_best,
            "ort_gemv_Bps": gemv_best}


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, min(vocab, 50000), size=n).tolist()


def worker_torch(args: argparse.Namespace) -> dict:
    """PyTorch eager fp32 reference: prefill, time to first token, decode at each context."""
    import torch

    from reference.checkpoint import load_model

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model = load_model(CKPT)
    load_s = time.perf_counter() - t0
    V = model.cfg.vocab_size
    out: dict = {"load_s": load_s}
    with torch.inference_mode():
        for n in args.prefill:
            ids = torch.tensor([_prompt(n, V)])
            model(ids[:, :8])  # warm-up
            t0 = time.perf_counter()
            logits, _ = model(ids)
            nxt = int(logits[0, -1].argmax())
            dt = time.perf_counter() - t0
            out[f"prefill_{n}_tok_s"] = n / dt
            out[f"ttft_{n}_s"] = dt
        for ctx in args.contexts:
            ids = torch.tensor([_prompt(ctx, V)])
            logits, past = model(ids)
            tok = logits[:, -1:].argmax(-1)
            model(tok, past_key_values=past)  # warm-up step (not kept)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                logits, past = model(tok, past_key_values=past)
                tok = logits[:, -1:].argmax(-1)
            out[f"decode_{ctx}_tok_s"] = args.steps / (time.perf_counter() - t0)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def worker_ort(args: argparse.Namespace) -> dict:
    """The runtime package on one artifact, as an app calls it: session load, prefill and TTFT
    through `generate`, decode through generate's own step loop. `--graph spec` forces model.onnx."""
    import runtime

    t0 = time.perf_counter()
    model = runtime.load(args.artifact, provider="cpu", threads=THREADS, graph=args.graph)
    load_s = time.perf_counter() - t0
    V = model.vocab_size
    out: dict = {"load_s": load_s, "rss_after_load_bytes": peak_rss_bytes(),
                 "graph": "model.kv.onnx" if model.kv_session is not None else "model.onnx"}

    def timed(prompt: list[int], new: int) -> float:
        t = time.perf_counter()
        r = model.generate(prompt, max_new_tokens=new, min_new_tokens=new)
        dt = time.perf_counter() - t
        assert len(r.ids) == new
        return dt

    for n in args.prefill:
        prompt = _prompt(n, V)
        timed(prompt[:8], 1)  # warm-up
        dt = timed(prompt, 1)
        out[f"prefill_{n}_tok_s"] = n / dt
        out[f"ttft_{n}_s"] = dt
        if n == args.prefill[0]:  # weights + a short prompt: before long contexts grow the cache and the arena
            out["peak_rss_first_prompt_bytes"] = peak_rss_bytes()
    def decode_rate(prompt: list[int], steps: int) -> float:
        """generate's own loop (Model._generation_steps, which yields after each step's token), timed from
        the first token to the last: the decode steps alone, no prompt in the difference."""
        rows, _, gen_args = model._prepare(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1)
        marks = [time.perf_counter() for _ in model._generation_steps(rows, gen_args, lambda i, t: None)]
        assert len(rows[0].ids) == steps + 1
        return steps / (marks[-1] - marks[0])

    for ctx in args.contexts:
        prompt = _prompt(ctx, V)
        decode_rate(prompt, 2)  # warm-up at this context
        out[f"decode_{ctx}_tok_s"] = decode_rate(prompt, args.steps)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


WORKERS = {"bandwidth": worker_bandwidth, "torch": worker_torch, "ort": worker_ort}


def run_worker(kind: str, args: argparse.Namespace, artifact: Path | None = None, graph: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--graph", graph,
           "--contexts", *map(str, args.contexts), "--prefill", *map(str, args.prefill)]
    if artifact is not None:
        cmd += ["--artifact", str(artifact)]
    busy0 = _cpu_busy()
    own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = run_json(cmd, f"bench worker {kind}", env=child_env(OMP_NUM_THREADS=str(THREADS)))
    # the machine is shared: a 2-thread ORT pool collapses when another process holds a core
    # (measured: int4 decode 73 -> 17 tok/s), so each row records how busy the CPUs were
    busy1 = _cpu_busy()
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    hz = os.sysconf("SC_CLK_TCK")
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    total = (busy1[1] - busy0[1]) / hz  # CPU-seconds available on all CPUs during the worker
    others = (busy1[0] - busy0[0]) / hz - own
    out["other_processes_cpu_fraction"] = round(max(0.0, others) / max(total, 1e-9), 3)
    return out


def median_result(runs: list[dict]) -> dict:
    """Per-key median of numeric results over rounds (the rest from the first round), plus the rounds."""
    import statistics

    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["rounds_raw"] = runs
    return out


def _cpu_busy() -> tuple[int, int]:
    """(busy jiffies, total jiffies) of all CPUs from /proc/stat."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 1
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


# -- the driver -----------------------------------------------------------------------------------

def export_key() -> str:
    """Hash of the exporter's and graph passes' source: a cached artifact from other code is rebuilt."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted([*(ROOT / "export").glob("*.py"), *(ROOT / "graphs").glob("*.py")]):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def ensure_artifact(precision: str, code: str) -> Path:
    out = CACHE / f"full-{code}-{precision}"
    keys_file = CACHE / "export-keys.json"
    keys = json.loads(keys_file.read_text()) if keys_file.is_file() else {}
    if (out / "manifest.json").is_file() and keys.get(out.name) == export_key():
        return out
    log(f"bench: exporting {precision} ({code} lift) to {out} with the parity gate (once; cached)")
    subprocess.run([sys.executable, "-m", "export", "build", "--model", str(CKPT), "--out", str(out),
                    "--code", code, "--precision", precision, "--force"], check=True, cwd=ROOT, env=child_env())
    keys = json.loads(keys_file.read_text()) if keys_file.is_file() else {}
    keys[out.name] = export_key()
    write_json(keys_file, keys)
    return out


def artifact_weight_bytes(folder: Path) -> int:
    return (folder / "model.onnx.data").stat().st_size + (folder / "model.onnx").stat().st_size


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("torch fp32", results.get("torch"))] + [(f"ort {p}", results["ort"].get(p)) for p in results["ort"]] + \
           [(f"ort {p}\nmodel.onnx", r) for p, r in results.get("ort_spec", {}).items()]
    rows = [(n, r) for n, r in rows if r]
    ctxs = results["args"]["contexts"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(ctxs))
    for j, ctx in enumerate(ctxs):
        ax.bar([i + j * width for i in range(len(rows))], [r.get(f"decode_{ctx}_tok_s", 0) for _, r in rows],
               width, label=f"decode at context {ctx}")
    for p, r in results["ort"].items():
        roof = results.get("roofline_tok_s", {}).get(p)
        if roof:
            ax.axhline(roof, linestyle=":", linewidth=1, color="gray")
            ax.text(len(rows) - 0.5, roof, f"{p} roofline {roof:.0f}", fontsize=7, va="bottom", ha="right")
    ax.set_xticks([i + width * (len(ctxs) - 1) / 2 for i in range(len(rows))], [n for n, _ in rows])
    ax.set_ylabel("tokens / s (batch 1, 2 threads)")
    ax.set_title("Full-size table-free model (0.47B) decode on this CPU")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def table(results: dict) -> str:
    """One row per runner; ratios against torch eager and the roofline come from this same run."""
    args = results["args"]
    pre, ctxs = args["prefill"], args["contexts"]
    n0, c0 = pre[0], ctxs[0]
    cols = ["load s", "peak RSS GB", "RSS / weights"] + [f"prefill {n} tok/s" for n in pre] + ["prefill x torch", f"TTFT {n0} s"] + \
           [f"decode@{c} tok/s" for c in ctxs] + (["decode ctx ratio"] if len(ctxs) > 1 else []) + ["% roofline", "decode x torch"]
    lines: list[list[str]] = []
    torch_r = results.get("torch")

    def row(name: str, r: dict, precision: str) -> list[str]:
        wb = results["weight_bytes"].get(precision, results["weight_bytes"]["checkpoint_fp32"])
        cells = [f"{r['load_s']:.2f}", f"{r['peak_rss_bytes'] / 1e9:.2f}", f"{r['peak_rss_bytes'] / wb:.2f}"]
        cells += [f"{r[f'prefill_{n}_tok_s']:.0f}" for n in pre]
        cells.append(f"{r[f'prefill_{n0}_tok_s'] / torch_r[f'prefill_{n0}_tok_s']:.2f}" if torch_r else "-")
        cells.append(f"{r[f'ttft_{n0}_s']:.3f}")
        cells += [f"{r[f'decode_{c}_tok_s']:.1f}" for c in ctxs]
        if len(ctxs) > 1:
            cells.append(f"{r[f'decode_{ctxs[-1]}_tok_s'] / r[f'decode_{c0}_tok_s']:.2f}")
        roof = results.get("roofline_tok_s", {}).get(precision)
        cells.append(f"{100 * r[f'decode_{c0}_tok_s'] / roof:.0f}%" if roof else "-")
        cells.append(f"{r[f'decode_{c0}_tok_s'] / torch_r[f'decode_{c0}_tok_s']:.2f}" if torch_r else "-")
        return [name, *cells]

    if torch_r:
        lines.append(row("torch eager fp32", torch_r, "fp32"))
    for p, r in results["ort"].items():
        lines.append(row(f"runtime {p} ({r.get('graph', 'model.onnx')})", r, p))
    for p, r in results.get("ort_spec", {}).items():
        lines.append(row(f"runtime {p} (model.onnx, graph='spec')", r, p))
    return markdown_table(["runner", *cols], lines)


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    """Issue 6's targets, each (what, met, measured) from this run; None where not measured."""
    args, ort_r, torch_r = results["args"], results["ort"], results.get("torch")
    c0, c1, n0 = args["contexts"][0], args["contexts"][-1], args["prefill"][0]
    roof = results.get("roofline_tok_s", {})
    out: list[tuple[str, bool | None, str]] = []

    def add(what: str, value: float | None, bound: float, fmt: str, higher: bool = True) -> None:
        if value is None:
            out.append((what, None, "not measured"))
        else:
            out.append((what, value >= bound if higher else value <= bound, fmt.format(value)))

    f = ort_r.get("fp32")
    if f:
        add("fp32 decode >= 90% of roofline", f[f"decode_{c0}_tok_s"] / roof["fp32"] if roof.get("fp32") else None, 0.9, "{:.0%}")
        add("fp32 decode >= 2.2x torch eager", f[f"decode_{c0}_tok_s"] / torch_r[f"decode_{c0}_tok_s"] if torch_r else None, 2.2, "{:.2f}x")
        add("fp32 load <= 1.5 s", f["load_s"], 1.5, "{:.2f} s", higher=False)
    if "int8" in ort_r:
        add("int8 decode >= 60 tok/s", ort_r["int8"][f"decode_{c0}_tok_s"], 60, "{:.1f} tok/s")
    if "int4" in ort_r:
        add("int4 decode >= 100 tok/s", ort_r["int4"][f"decode_{c0}_tok_s"], 100, "{:.1f} tok/s")
    for p, r in ort_r.items():
        if torch_r:
            add(f"{p} prefill {n0} >= 2x torch eager", r[f"prefill_{n0}_tok_s"] / torch_r[f"prefill_{n0}_tok_s"], 2.0, "{:.2f}x")
        if c1 != c0:
            add(f"{p} decode@{c1} within 15% of decode@{c0}", r[f"decode_{c1}_tok_s"] / r[f"decode_{c0}_tok_s"], 0.85, "{:.2f}")
        wb = results["weight_bytes"].get(p)
        first = r.get("peak_rss_first_prompt_bytes")
        add(f"{p} peak RSS <= 1.15x weight bytes (load + {n0}-token prompt)", first / wb if wb and first else None, 1.15,
            "{:.2f}x", higher=False)
        add(f"{p} peak RSS <= 1.15x weight bytes (whole run, up to context {c1})", r["peak_rss_bytes"] / wb if wb else None,
            1.15, "{:.2f}x", higher=False)
    return out


def report(results: dict) -> str:
    bw = results["bandwidth"]["read_bandwidth_Bps"]
    rounds = results.get("rounds", 1)
    lines = [f"read bandwidth {bw / 1e9:.1f} GB/s, median of {rounds} (" +
             ", ".join(f"{k} {v / 1e9:.1f}" for k, v in results["bandwidth"].items()
                       if k.endswith("_Bps") and k != "read_bandwidth_Bps") + "); roofline tok/s: " +
             ", ".join(f"{k} {v:.1f}" for k, v in results["roofline_tok_s"].items()),
             f"parity gate (from each manifest): {results.get('parity')}", "", table(results), ""]
    met_rows = [(what, "-" if met is None else ("yes" if met else "NO"), value) for what, met, value in targets(results)]
    lines.append(markdown_table(["target", "met", "measured"], met_rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--code", default="arith", choices=("bitwise", "arith", "lookup"), help="lift mode of the artifacts")
    p.add_argument("--contexts", nargs="+", type=int, default=[128, 900], help="decode measured after prompts of these lengths")
    p.add_argument("--prefill", nargs="+", type=int, default=[128, 512], help="prompt lengths for prefill speed")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed at each context")
    p.add_argument("--skip-torch", action="store_true", help="do not time the PyTorch eager reference")
    p.add_argument("--skip-spec", action="store_true",
                   help="do not also time each artifact on model.onnx alone (graph='spec'), beside the default")
    p.add_argument("--graph", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3, help="runs of every runner, interleaved; figures are medians (default 3)")
    p.add_argument("--quick", action="store_true", help="8 decode steps, one context, one prefill length")
    p.add_argument("--report", action="store_true", help="print the table, targets and chart of results/bench.json again; measure nothing")
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    if args.report:
        results = json.loads((RESULTS / "bench.json").read_text())
        chart(results, RESULTS / "bench.png")
        print(report(results))
        return 0
    if args.quick:
        args.steps, args.contexts, args.prefill, args.rounds = 8, args.contexts[:1], args.prefill[:1], 1

    ensure_full_checkpoint(CKPT)
    artifacts = {prec: ensure_artifact(prec, args.code) for prec in args.precisions}
    results: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "artifact")},
                     "machine": {"cpu": platform.processor() or platform.machine(), "threads": THREADS,
                                 "nproc": os.cpu_count(), "cpu_info": cpu_info()},
                     "date": time.strftime("%Y-%m-%d %H:%M:%S"), "ort": {}}
    results["weight_bytes"] = {"checkpoint_fp32": weight_bytes(CKPT)}
    for prec, folder in artifacts.items():
        results["weight_bytes"][prec] = artifact_weight_bytes(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        results.setdefault("parity", {})[prec] = manifest.get("parity", {}).get("passed")
    # The machine's memory bandwidth drifts by +-15% within minutes (other tenants of the host; the
    # 2-thread GEMV read 44.9-58.6 GB/s in runs minutes apart), so every runner runs `rounds` times,
    # interleaved with the others, and each figure is the median over the rounds.
    runners: list[tuple[str, str, str | None, Path | None, str]] = [("bandwidth", "", None, None, "read bandwidth")]
    if not args.skip_torch:
        runners.append(("torch", "", None, None, "PyTorch eager reference"))
    for prec, folder in artifacts.items():
        runners.append(("ort", prec, None, folder, f"runtime {prec}"))
        if not args.skip_spec:
            runners.append(("ort_spec", prec, "spec", folder, f"runtime {prec} on model.onnx (graph='spec')"))
    rounds: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for key, prec, graph, folder, what in runners:
            log(f"bench: round {r + 1}/{args.rounds}: {what}")
            kind = key if key in ("torch", "bandwidth") else "ort"
            rounds.setdefault((key, prec), []).append(run_worker(kind, args, folder, graph=graph or "auto"))
    for (key, prec), runs in rounds.items():
        med = median_result(runs)
        if key in ("torch", "bandwidth"):
            results[key] = med
        else:
            results.setdefault(key, {})[prec] = med
    results["rounds"] = args.rounds
    bw = results["bandwidth"]["read_bandwidth_Bps"]
    results["roofline_tok_s"] = {prec: bw / results["weight_bytes"][prec] for prec in artifacts}

    write_json(RESULTS / "bench.json", results)
    chart(results, RESULTS / "bench.png")
    print(report(results))
    print(f"\nwrote {RESULTS / 'bench.json'} and {RESULTS / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
