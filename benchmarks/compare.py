"""What the input table costs: two artifacts of the same shape side by side (issue 14).

The paper's point is the comparison of a table-free model with its learned-input-table twin.
This driver runs the runtime on each artifact in fresh processes (benchmarks/bench.py's `ort`
worker: session load, prefill through `generate`, decode through generate's own step loop, peak
RSS), interleaved over rounds with medians, and prints one table: size on disk, peak RSS, load
time, prefill and decode tokens/s, and B relative to A.

    python benchmarks/compare.py ARTIFACT_A ARTIFACT_B       # any two artifacts of one shape
    python benchmarks/compare.py --make-pair                  # factory twins (d 512, 8 layers, V 65,536):
                                                              # learned table vs table-free, exported, compared

    python benchmarks/compare.py --twins --eval              # the trained demo model against its trained
                                                              # learned-table twin, with lm-eval task scores

`--make-pair` writes both checkpoints with the same seed, so every tensor they share is identical
(the factory seeds each tensor by its name); they differ only in the input: a [V, d] table vs the
code (a seeded random invertible A and b). Both are exported fp32 with the parity gate on.

`--twins` compares TRAINED models, where the table's cost shows in quality: the demo model
(models/shakespeare) and the twin `python -m reference.train --input-table` trains with the demo's
recipe (seed, init of every shared tensor, data order, schedule; `TWIN_TRAIN` below), cached in
benchmarks/cache/twins/. `--eval` adds lm-eval's scores on the offline tasks (evaluation/tasks)
through the `tablefree-onnx` model class, each artifact in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (the worker and its measurement conventions: one source for both tables)

PAIR = ROOT / "benchmarks" / "cache" / "pair"
TWINS = ROOT / "benchmarks" / "cache" / "twins"
TWIN_TRAIN = "--input-table --steps 2500 --stop-after 2385 --eval-every 100"  # models/shakespeare's recipe
EVAL_TASKS = ("tablefree_mc", "tablefree_cloze", "tablefree_ppl", "tablefree_gen")
EVAL_ROWS = (("mc accuracy", "tablefree_mc", "acc,none"), ("cloze accuracy", "tablefree_cloze", "acc,none"),
             ("cloze target perplexity", "tablefree_cloze", "perplexity,none"),
             ("generated cloze exact match", "tablefree_gen", "exact_match,strip"),
             ("document word perplexity", "tablefree_ppl", "word_perplexity,none"),
             ("document bits per byte", "tablefree_ppl", "bits_per_byte,none"))
PAIR_SHAPE = dict(vocab_size=65536, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  intermediate_size=2048, max_position_embeddings=1024)


def artifact_files_bytes(folder: Path) -> int:
    """Everything a user downloads: the graphs, the weights file and the small JSON/tokenizer files."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def make_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Factory twins and their fp32 artifacts (cached: rebuilt only when missing)."""
    from export.build import build
    from reference.config import CodeConfig, ModelConfig
    from reference.factory import make_checkpoint
    from reference.lift import random_invertible_gf2

    outs = []
    for name, table in (("table", True), ("tablefree", False)):
        art = root / f"{name}-fp32"
        if not (art / "manifest.json").is_file():
            A, b = random_invertible_gf2(16, seed=seed)
            cfg = ModelConfig(**PAIR_SHAPE, input_table=table, code=CodeConfig(bits=16, A=A, b=b))
            bench.log(f"compare: writing the {name} checkpoint ({PAIR_SHAPE})")
            ckpt = make_checkpoint(root / f"{name}-ckpt", cfg, seed=seed)
            t0 = time.perf_counter()
            build(ckpt, art, lift_mode="table" if table else "arith", force=True, log=bench.log)
            bench.log(f"compare: exported {name} in {time.perf_counter() - t0:.0f} s")
        outs.append(art)
    return outs[0], outs[1]


def make_twins(root: Path = TWINS) -> tuple[Path, Path]:
    """fp32 artifacts of the demo model and its trained table twin (exported when missing)."""
    from export.build import build

    ckpt = root / "table"
    if not (ckpt / "model.safetensors").is_file():
        raise SystemExit(f"error: no trained table twin in {ckpt}; train it first (about 13 min on 2 cores):\n"
                         f"  TABLEFREE_DATA=DIR python -m reference.train {TWIN_TRAIN} --out {ckpt}")
    outs = []
    for name, src, mode in (("tablefree", ROOT / "models" / "shakespeare", "arith"), ("table", ckpt, "table")):
        art = root / f"{name}-fp32"
        if not (art / "manifest.json").is_file():
            bench.log(f"compare: exporting {src}")
            build(src, art, lift_mode=mode, force=True, log=bench.log)
        outs.append(art)
    return outs[0], outs[1]


def run_eval(folder: Path, out: Path) -> dict:
    """lm-eval on the offline tasks through `python -m evaluation` in a fresh process: task -> metrics."""
    import subprocess

    cmd = [sys.executable, "-m", "evaluation", "--model", "tablefree-onnx", "--model_args",
           f"path={folder},threads={bench.THREADS}", "--tasks", *EVAL_TASKS, "--output_path", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: lm-eval failed on {folder}:\n{r.stderr[-3000:]}")
    newest = max(Path(out).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    res = json.loads(newest.read_text())["results"]
    res["wall_s"] = time.perf_counter() - t0
    return res


def describe(folder: Path) -> dict:
    m = json.loads((Path(folder) / "manifest.json").read_text())
    c = json.loads((Path(folder) / "config.json").read_text())
    return {"folder": str(folder), "lift": m["lift"]["mode"], "precision": m["precision"],
            "parity_passed": (m.get("parity") or {}).get("passed"), "bytes_on_disk": artifact_files_bytes(folder),
            "shape": {k: c[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}}


def table(res: dict) -> str:
    a, b = res["a"], res["b"]
    ctx, n = res["args"]["contexts"][0], res["args"]["prefill"][0]
    rows = [("", f"A: {a['lift']} {a['precision']}", f"B: {b['lift']} {b['precision']}", "B / A"),
            ("size on disk (MB)", a["bytes_on_disk"] / 1e6, b["bytes_on_disk"] / 1e6, None),
            ("peak RSS (MB)", a["peak_rss_bytes"] / 1e6, b["peak_rss_bytes"] / 1e6, None),
            ("load (s)", a["load_s"], b["load_s"], None),
            (f"prefill {n} tokens (tok/s)", a[f"prefill_{n}_tok_s"], b[f"prefill_{n}_tok_s"], None),
            (f"decode after {ctx} (tok/s)", a[f"decode_{ctx}_tok_s"], b[f"decode_{ctx}_tok_s"], None)]
    if "eval" in a and "eval" in b:
        rows += [(label, a["eval"][task][metric], b["eval"][task][metric], None) for label, task, metric in EVAL_ROWS]
        rows.append(("lm-eval wall, 4 tasks (s)", a["eval"]["wall_s"], b["eval"]["wall_s"], None))
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * 4]
    for name, x, y, _ in rows[1:]:
        lines.append(f"| {name} | {x:.4g} | {y:.4g} | {y / x:.3f} |" if x else f"| {name} | {x:.4g} | {y:.4g} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="*", help="two artifact folders of the same shape (A, then B)")
    p.add_argument("--make-pair", action="store_true", help="build factory twins (learned table, table-free) and compare them")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each; figures are medians (default 3)")
    p.add_argument("--prefill", nargs="+", type=int, default=[128])
    p.add_argument("--contexts", nargs="+", type=int, default=[128])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--twins", action="store_true", help="the trained demo model against its trained table twin")
    p.add_argument("--eval", action="store_true", help="add lm-eval scores on the offline tasks (evaluation/tasks)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.make_pair:
        a, b = make_pair(PAIR)
    elif args.twins:
        a, b = make_twins()
    elif len(args.artifacts) == 2:
        a, b = (Path(x) for x in args.artifacts)
    else:
        p.error("pass two artifact folders, or --make-pair")
    da, db = describe(a), describe(b)
    if da["shape"] != db["shape"]:
        p.error(f"the artifacts differ in shape ({da['shape']} vs {db['shape']}); compare twins of one shape")
    args.graph = "auto"
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for key, folder in (("a", a), ("b", b)):
            bench.log(f"compare: round {r + 1}/{args.rounds}: {folder.name}")
            runs[key].append(bench.run_worker("ort", args, folder))
    res = {"args": {k: v for k, v in vars(args).items() if k != "artifacts"}, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "a": {**da, **bench.median_result(runs["a"])}, "b": {**db, **bench.median_result(runs["b"])}}
    if args.eval:
        for key, folder in (("a", a), ("b", b)):
            bench.log(f"compare: lm-eval on {folder.name}")
            res[key]["eval"] = run_eval(folder, Path(folder).parent / f"lm-eval-{Path(folder).name}")
    print(table(res))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
