"""Full-size factory benchmark: write the 0.5B seed-shaped folder, then load it into the reference.

Each phase runs in its own subprocess so that its peak RSS (VmHWM) is its own, not the sum of
both. Targets (issue 2): write <= 90 s with peak RSS <= 2.5 GB; load peak RSS <= 2x the weight bytes.

    .venv/bin/python benchmarks/factory_bench.py [--out benchmarks/cache/factory_full] [--keep]

Prints a table and writes benchmarks/results/factory.json. Needs about 2 GB of disk; the folder
is deleted afterwards unless --keep is given.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from common import CACHE, RESULTS, run_json, text_table, weight_bytes, write_json

OUT_JSON = RESULTS / "factory.json"

# runs in a child (common.child_env puts the project on PYTHONPATH); VmRSS before the phase is its base
_PHASE = r"""
import json, sys, time

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0

import torch
base = vm("VmRSS:")
t0 = time.perf_counter()
if {phase!r} == "write":
    from reference.config import CodeConfig, full_config
    from reference.factory import make_checkpoint
    from reference.lift import random_invertible_gf2
    cfg = full_config()
    A, b = random_invertible_gf2(16, seed=0)
    cfg.code = CodeConfig(A=A, b=b)
    make_checkpoint({out!r}, cfg, seed=0)
    extra = {{}}
else:
    from reference.checkpoint import load_model
    model = load_model({out!r})
    t1 = time.perf_counter()
    with torch.no_grad():
        logits, _ = model(torch.tensor([[57345, 104, 101, 108, 108, 111]]))
    extra = {{"params": sum(p.numel() for p in model.parameters()), "logits_finite": bool(torch.isfinite(logits).all()),
              "load_seconds": t1 - t0}}
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_rss=vm("VmHWM:"), base_rss=base, **extra)))
"""


def run_phase(phase: str, out: Path) -> dict:
    return run_json([sys.executable, "-c", _PHASE.format(phase=phase, out=str(out))], f"{phase} phase")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=CACHE / "factory_full")
    p.add_argument("--keep", action="store_true", help="keep the written folder (other benchmarks may reuse it)")
    args = p.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    write = run_phase("write", args.out)
    write_wall = time.perf_counter() - t0
    wb = weight_bytes(args.out)
    load = run_phase("load", args.out)
    gb = 1e9
    result = {
        "weight_bytes": wb,
        "write": {**write, "wall_seconds_with_startup": write_wall, "target_seconds": 90, "target_peak_rss": 2.5 * gb},
        "load": {**load, "ratio_to_weights": load["peak_rss"] / wb,
                 "ratio_to_weights_above_base": (load["peak_rss"] - load["base_rss"]) / wb, "target_ratio": 2.0},
    }
    result["write"]["ok"] = write["seconds"] <= 90 and write["peak_rss"] <= 2.5 * gb
    result["load"]["ok"] = result["load"]["ratio_to_weights"] <= 2.0
    ok = {True: "ok", False: "MISSED"}
    print(text_table(["phase", "seconds", "peak RSS GB", "base RSS GB", "notes"], [
        ("write", f"{write['seconds']:.1f}", f"{write['peak_rss'] / gb:.2f}", f"{write['base_rss'] / gb:.2f}",
         f"{wb / gb:.2f} GB of weights; target <= 90 s, <= 2.5 GB: {ok[result['write']['ok']]}"),
        ("load", f"{load['load_seconds']:.1f}", f"{load['peak_rss'] / gb:.2f}", f"{load['base_rss'] / gb:.2f}",
         f"peak / weights = {result['load']['ratio_to_weights']:.2f} (target <= 2): {ok[result['load']['ok']]}; "
         f"{load['params'] / 1e6:.0f}M params"),
    ]))
    write_json(OUT_JSON, result)
    print(f"wrote {OUT_JSON}")
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
