"""Partial rotary on the fast path (issue 21 item 1): model.kv.onnx against model.onnx, side by side.

Why: a partial-rotary model used to be refused a kv graph (GroupQueryAttention rotates whole heads),
so it ran on model.onnx, whose Concat cache is copied every decode step. Now its kv graph rotates
q and k with RotaryEmbedding in front of the op (graphs/rotary.py). This measures what that buys
at context 900 on the full-size shape with RoPE on 8 of each head's 32 features (GPT-NeoX's
rotary_pct 0.25), one artifact, the runtime on each graph in fresh processes (benchmarks/bench.py's
`ort` worker), interleaved over rounds, medians. `graph="spec"` serves every call with model.onnx,
exactly what a `--no-kv-graph` build of the same checkpoint serves.

    python benchmarks/rotary_bench.py [--size full|mid] [--precision fp32] [--rounds 3] [--steps 32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
from common import CACHE, RESULTS, log, write_json  # noqa: E402

# full: the seed's shape, RoPE on 8 of each head's 32 features; mid: d 512, 8 layers, 8 heads of 64, RoPE on 16
SHAPES = {"full": (dict(), 8),
          "mid": (dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048), 16)}


def ensure_artifact(precision: str, size: str) -> Path:
    """The full-size factory checkpoint with partial rotary, exported by the default build (cached)."""
    from export.build import build
    from reference.config import CodeConfig, ModelConfig
    from reference.factory import make_checkpoint
    from reference.lift import random_invertible_gf2

    shape, rotary_dim = SHAPES[size]
    art = CACHE / f"{size}-rotary{rotary_dim}-arith-{precision}"
    if (art / "manifest.json").is_file():
        return art
    ckpt = CACHE / f"{size}-rotary{rotary_dim}-ckpt"
    if not (ckpt / "config.json").is_file():
        A, b = random_invertible_gf2(16, seed=0)
        make_checkpoint(ckpt, ModelConfig(**shape, rotary_dim=rotary_dim, code=CodeConfig(bits=16, A=A, b=b)), seed=0)
    t0 = time.perf_counter()
    build(ckpt, art, lift_mode="arith", precision=precision, force=True, log=log)
    log(f"rotary_bench: exported {art.name} in {time.perf_counter() - t0:.0f} s")
    return art


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    p.add_argument("--size", default="full", choices=tuple(SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--contexts", nargs="+", type=int, default=[900])
    args = p.parse_args(argv)
    args.prefill = [128]
    art = ensure_artifact(args.precision, args.size)
    runs: dict[str, list[dict]] = {"auto": [], "spec": []}
    for r in range(args.rounds):
        for graph in runs:
            runs[graph].append(bench.run_worker("ort", args, art, graph=graph))
            log(f"round {r + 1} {graph}: " + ", ".join(f"decode@{c} {runs[graph][-1][f'decode_{c}_tok_s']:.2f} tok/s"
                                                     for c in args.contexts))
    out = {"artifact": str(art), "precision": args.precision, "size": args.size, "rotary_dim": SHAPES[args.size][1],
           "runs": runs}
    print(f"| graph | {' | '.join(f'decode@{c} tok/s (rounds)' for c in args.contexts)} | median | other CPU |")
    print("|---|" + "---|" * (len(args.contexts) + 2))
    med = {}
    for graph, rs in runs.items():
        name = rs[0]["graph"]
        for c in args.contexts:
            vals = [x[f"decode_{c}_tok_s"] for x in rs]
            med[(graph, c)] = statistics.median(vals)
            print(f"| {name} | {' / '.join(f'{v:.2f}' for v in vals)} | {med[(graph, c)]:.2f} | "
                  f"{max(x['other_processes_cpu_fraction'] for x in rs):.2f} |")
    for c in args.contexts:
        print(f"kv graph / model.onnx at context {c}: {med[('auto', c)] / med[('spec', c)]:.2f}x")
    out["median"] = {f"{g}_{c}": v for (g, c), v in med.items()}
    write_json(RESULTS / f"rotary_{args.size}_{args.precision}.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
