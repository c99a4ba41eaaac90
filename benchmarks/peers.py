"""`make bench-peers`: the full-size model on this CPU in the strongest CPU runtimes, same weights, same threads.

Why: every speed claim of bench.py is against PyTorch eager. A user who wants a small LM fast on a
CPU reaches for llama.cpp, OpenVINO or torch.compile, so this driver runs the same full-size
factory checkpoint in each of them beside the runtime, one table:

- the runtime (benchmarks/bench.py's `ort` worker) on the fp32 / int8 / int4 artifacts;
- llama.cpp (llama-cpp-python built from its sdist) on the checkpoint written as GGUF, F32 and
  its Q8_0 / Q4_0 quantizations (llama.cpp has no table-free input: token_embd is the code
  materialised, exact); its logits are checked against the PyTorch reference before any timing;
- OpenVINO's CPU plugin on the artifact's model.onnx (each precision its ONNX frontend reads);
- torch.compile of the reference beside eager; onnxruntime-genai on each artifact.

Every measurement is a fresh process (benchmarks/peer_workers.py or bench.py's workers) and
runs `--rounds` times interleaved with the others; figures are medians. The machine is shared, so
each row records the share of the CPUs other processes used while it ran (/proc/stat).

    python benchmarks/peers.py                   # everything (setup: make setup-peers)
    python benchmarks/peers.py --only llama.cpp ours --rounds 1
    python benchmarks/peers.py --report          # table and chart of results/peers.json again
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import bench
from common import CACHE, RESULTS, ROOT, THREADS, child_env, log, markdown_table, weight_bytes, write_json

VENVS = ROOT / ".venvs"
PEERS_PY = VENVS / "peers" / "bin" / "python"
GENAI_PY = VENVS / "genai" / "bin" / "python"
WORKERS = Path(__file__).resolve().parent / "peer_workers.py"
GGUF_DIR = CACHE / "gguf"
LLAMA_OF = {"fp32": ["F32"], "int8": ["Q8_0"], "int4": ["Q4_0", "Q4_K_M"]}  # llama.cpp's types beside each of ours
RUNNERS = ("ours", "torch", "torch.compile", "openvino", "llama.cpp", "genai")


def run_child(cmd: list[str], what: str) -> dict:
    """One worker in a fresh process; its JSON plus the share of the CPUs other processes used meanwhile."""
    busy0, own0 = bench._cpu_busy(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = bench.run_json(cmd, what, env=child_env(OMP_NUM_THREADS=str(THREADS)))
    busy1, own1 = bench._cpu_busy(), resource.getrusage(resource.RUSAGE_CHILDREN)
    hz = os.sysconf("SC_CLK_TCK")
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    total = (busy1[1] - busy0[1]) / hz
    out["other_processes_cpu_fraction"] = round(max(0.0, (busy1[0] - busy0[0]) / hz - own) / max(total, 1e-9), 3)
    out["wall_s"] = time.perf_counter() - t0
    return out


@contextlib.contextmanager
def held(lock_path: str | None):
    """flock on lock_path for the block (nothing without one): the rounds of a machine shared with other jobs."""
    if not lock_path:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def need(py: Path, what: str) -> None:
    if not py.is_file():
        raise SystemExit(f"{what} needs {py}; run `make setup-peers` first")


def ensure_gguf(quants: list[str]) -> dict:
    need(PEERS_PY, "the GGUF files")
    log(f"peers: GGUF files in {GGUF_DIR} (written once; cached)")
    return bench.run_json([str(PEERS_PY), str(WORKERS), "gguf", "--ckpt", str(bench.CKPT), "--out", str(GGUF_DIR),
                           "--quants", *quants], "GGUF writer", env=child_env())


def plan(args: argparse.Namespace, artifacts: dict, ggufs: dict) -> list[tuple[str, str, list[str]]]:
    """(runner, precision, command) of every measurement of one round."""
    proto = ["--steps", str(args.steps), "--contexts", *map(str, args.contexts), "--prefill", *map(str, args.prefill)]
    me, out = sys.executable, []
    for prec in args.precisions:
        a = str(artifacts[prec])
        if "ours" in args.only:
            out.append(("ours", prec, [me, str(bench.__file__), "--worker", "ort", "--artifact", a, "--graph", "auto", *proto]))
        for q in (LLAMA_OF[prec] if "llama.cpp" in args.only else []):
            if q in ggufs:
                out.append((f"llama.cpp {q}", prec, [str(PEERS_PY), str(WORKERS), "llama", "--model", ggufs[q]["path"], *proto]))
        if "openvino" in args.only and prec in args.ov_precisions:
            out.append(("openvino", prec, [str(PEERS_PY), str(WORKERS), "openvino", "--model", a, *proto]))
        if "genai" in args.only:
            out.append(("genai", prec, [str(GENAI_PY), str(WORKERS), "genai", "--model", a, *proto]))
    if "torch" in args.only and "fp32" in args.precisions:
        out.append(("torch", "fp32", [me, str(bench.__file__), "--worker", "torch", *proto]))
    if "torch.compile" in args.only and "fp32" in args.precisions:
        out.append(("torch.compile", "fp32", [me, str(WORKERS), "torch_compile", "--model", str(bench.CKPT), *proto]))
    return out


def median_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["other_cpu_max"] = max(r["other_processes_cpu_fraction"] for r in runs)
    out["rounds_raw"] = runs
    return out


def label(runner: str, prec: str, results: dict) -> str:
    return f"{runner} ({prec} row)" if runner.startswith("llama.cpp") else f"{runner} {prec}"


def table(results: dict) -> str:
    """One row per runner and precision; `x ours` is the ratio to the runtime at the same precision."""
    a = results["args"]
    n0, (c0, c1) = a["prefill"][0], (a["contexts"][0], a["contexts"][-1])
    rows = []
    for key, r in results["runs"].items():
        runner, prec = key.split("|")
        us = results["runs"].get(f"ours|{prec}")
        ratio = lambda k: f"{r[k] / us[k]:.2f}" if us and runner != "ours" else "-"  # noqa: E731
        ids_key = f"greedy_{c0}_ids"
        same = "-" if runner == "ours" or ids_key not in r or not results.get("ours_ids", {}).get(prec) else \
            f"{sum(x == y for x, y in zip(r[ids_key], results['ours_ids'][prec]))}/{len(r[ids_key])}"
        rows.append([label(runner, prec, results), f"{r['weight_bytes'] / 1e9:.2f}", f"{r['peak_rss_bytes'] / 1e9:.2f}",
                     f"{r['load_s']:.1f}", f"{r[f'prefill_{n0}_tok_s']:.0f}", ratio(f"prefill_{n0}_tok_s"),
                     f"{r[f'ttft_{n0}_s']:.3f}", f"{r[f'decode_{c0}_tok_s']:.1f}", ratio(f"decode_{c0}_tok_s"),
                     f"{r[f'decode_{c1}_tok_s']:.1f}", ratio(f"decode_{c1}_tok_s"),
                     f"{r[f'decode_{c1}_tok_s'] / r[f'decode_{c0}_tok_s']:.2f}", same,
                     f"{100 * r['other_processes_cpu_fraction']:.0f}% ({100 * r['other_cpu_max']:.0f}%)"])
    hdr = ["runner", "weights GB", "peak RSS GB", "load s", f"prefill {n0} tok/s", "x ours", f"TTFT {n0} s",
           f"decode@{c0} tok/s", "x ours", f"decode@{c1} tok/s", "x ours", f"@{c1}/@{c0}", "greedy = ours",
           "other CPU median (max)"]
    return markdown_table(hdr, rows)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = results["args"]
    n0, c0, c1 = a["prefill"][0], a["contexts"][0], a["contexts"][-1]
    keys = list(results["runs"])
    names = [label(*k.split("|"), results) for k in keys]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    x = range(len(keys))
    for j, (c, w) in enumerate(((c0, -0.2), (c1, 0.2))):
        ax1.bar([i + w for i in x], [results["runs"][k][f"decode_{c}_tok_s"] for k in keys], 0.4,
                label=f"decode at context {c}")
    ax2.bar(list(x), [results["runs"][k][f"prefill_{n0}_tok_s"] for k in keys], 0.6, color="tab:green")
    for ax, t in ((ax1, "decode tok/s"), (ax2, f"prefill {n0} tok/s")):
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(t + " (batch 1, 2 threads)")
    ax1.legend()
    fig.suptitle(f"Same full-size weights (0.47B) on this CPU, medians of {results['rounds']} interleaved rounds")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def ours_greedy(artifacts: dict, args: argparse.Namespace) -> dict:
    """The runtime's greedy ids at steps 3-10 after the context-c0 prompt (what each worker reports)."""
    code = ("import json,sys; sys.path.insert(0,'benchmarks'); import runtime; from peer_workers import prompt_ids\n"
            "out={}\nfor p,a in json.loads(sys.argv[1]).items():\n"
            "  m=runtime.load(a, provider='cpu', threads=2); r=m.generate(prompt_ids(int(sys.argv[2])), max_new_tokens=11,"
            " min_new_tokens=11); out[p]=list(r.ids)[3:11]\nprint(json.dumps(out))")
    return bench.run_json([sys.executable, "-c", code, json.dumps({p: str(a) for p, a in artifacts.items()}),
                           str(args.contexts[0])], "the runtime's greedy ids")


def checks(args: argparse.Namespace, artifacts: dict) -> dict:
    """The GGUF files (written once), then llama.cpp's and the runtime's logits against the reference."""
    quants = [q for prec in args.precisions if prec != "fp32" for q in LLAMA_OF[prec]]
    ggufs = ensure_gguf(quants) if "llama.cpp" in args.only else {}
    results: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "threads": THREADS,
                     "gguf": ggufs, "runs": {}}
    if ggufs:
        results["llama_logits_check"] = {}
        for name in ("F32", *quants):
            log(f"peers: llama.cpp {name} logits against the PyTorch reference")
            results["llama_logits_check"][name] = bench.run_json(
                [str(PEERS_PY), str(WORKERS), "llama_check", "--model", ggufs[name]["path"], "--ckpt", str(bench.CKPT)],
                f"llama.cpp {name} logits check", env=child_env(OMP_NUM_THREADS=str(THREADS)))
            log(f"  {json.dumps(results['llama_logits_check'][name])}")
        results["ours_logits_check"] = {}
        for prec, a in artifacts.items():
            results["ours_logits_check"][prec] = bench.run_json(
                [sys.executable, str(WORKERS), "ours_check", "--model", str(a), "--ckpt", str(bench.CKPT)],
                f"runtime {prec} logits check", env=child_env(OMP_NUM_THREADS=str(THREADS)))
            log(f"  runtime {prec}: {json.dumps(results['ours_logits_check'][prec])}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", nargs="+", default=list(bench.PRECISIONS), choices=bench.PRECISIONS)
    p.add_argument("--only", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    p.add_argument("--ov-precisions", nargs="+", default=list(bench.PRECISIONS), choices=bench.PRECISIONS,
                   help="artifacts OpenVINO runs (its ONNX frontend must read their quantized MatMuls)")
    p.add_argument("--contexts", nargs="+", type=int, default=[128, 900])
    p.add_argument("--prefill", nargs="+", type=int, default=[128])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check-only", action="store_true", help="write the GGUFs and check llama.cpp's logits; time nothing")
    p.add_argument("--report", action="store_true", help="print the table and redraw the chart of results/peers.json")
    p.add_argument("--out", default=str(RESULTS / "peers.json"))
    p.add_argument("--lock", help="hold flock on this file during each round (a machine shared with other jobs)")
    args = p.parse_args(argv)
    out_path = Path(args.out)
    if args.report:
        results = json.loads(out_path.read_text())
        chart(results, out_path.with_suffix(".png"))
        print(table(results))
        return 0
    with held(args.lock):
        bench.ensure_full_checkpoint(bench.CKPT)
        artifacts = {prec: bench.ensure_artifact(prec, "arith") for prec in args.precisions}
        results = checks(args, artifacts)
        if args.check_only:
            write_json(out_path, results)
            return 0
        results["ours_ids"] = ours_greedy(artifacts, args)
    ggufs = results["gguf"]
    todo = plan(args, artifacts, ggufs)
    raw: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        with held(args.lock):
            for runner, prec, cmd in todo:
                log(f"peers: round {r + 1}/{args.rounds}: {runner} {prec}")
                raw.setdefault(f"{runner}|{prec}", []).append(run_child(cmd, f"{runner} {prec}"))
        results["rounds"] = r + 1
        for key, runs in raw.items():  # written after every round: a cut run keeps what it measured
            runner, prec = key.split("|")
            med = median_of(runs)
            med["weight_bytes"] = (ggufs[runner.split()[1]]["bytes"] if runner.startswith("llama.cpp") else
                                   weight_bytes(bench.CKPT) if runner.startswith("torch") else
                                   bench.artifact_weight_bytes(artifacts[prec]))
            results["runs"][key] = med
        write_json(out_path, results)
    chart(results, out_path.with_suffix(".png"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
