"""Full-size factory benchmark: write the 0.5B seed-shaped folder, then load it into the reference.

Each phase runs in its own subprocess so that its peak RSS (VmHWM) is its own, not the sum of
both. Targets (issue 2): write <= 90 s with peak RSS <= 2.5 GB; load peak RSS <= 2x the weight bytes.

    .venv/bin/python benchmarks/factory_bench.py [--out benchmarks/cache/factory_full] [--keep]

Prints a table and writes benchmarks/results/factory.json. Needs about 2 GB of disk; the folder
is deleted afterwards unless --keep is given.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "factory.json"

_PHASE = r"""
import json, sys, time
sys.path.insert(0, {root!r})

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
    code = _PHASE.format(root=str(ROOT), phase=phase, out=str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{phase} phase failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "cache" / "factory_full")
    p.add_argument("--keep", action="store_true", help="keep the written folder (other benchmarks may reuse it)")
    args = p.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    write = run_phase("write", args.out)
    write_wall = time.perf_counter() - t0
    weight_bytes = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    load = run_phase("load", args.out)
    gb = 1e9
    result = {
        "weight_bytes": weight_bytes,
        "write": {**write, "wall_seconds_with_startup": write_wall, "target_seconds": 90, "target_peak_rss": 2.5 * gb},
        "load": {**load, "ratio_to_weights": load["peak_rss"] / weight_bytes,
                 "ratio_to_weights_above_base": (load["peak_rss"] - load["base_rss"]) / weight_bytes, "target_ratio": 2.0},
    }
    result["write"]["ok"] = write["seconds"] <= 90 and write["peak_rss"] <= 2.5 * gb
    result["load"]["ok"] = result["load"]["ratio_to_weights"] <= 2.0
    print(f"{'phase':<6} {'seconds':>8} {'peak RSS GB':>12} {'base RSS GB':>12}  notes")
    print(f"{'write':<6} {write['seconds']:8.1f} {write['peak_rss'] / gb:12.2f} {write['base_rss'] / gb:12.2f}  "
          f"{weight_bytes / gb:.2f} GB of weights; target <= 90 s, <= 2.5 GB: {'ok' if result['write']['ok'] else 'MISSED'}")
    print(f"{'load':<6} {load['load_seconds']:8.1f} {load['peak_rss'] / gb:12.2f} {load['base_rss'] / gb:12.2f}  "
          f"peak / weights = {result['load']['ratio_to_weights']:.2f} (target <= 2): {'ok' if result['load']['ok'] else 'MISSED'}; "
          f"{load['params'] / 1e6:.0f}M params")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(RESULTS)
    print(f"wrote {RESULTS}")
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
