"""Full-size export benchmark: the 0.5B seed-shaped synthetic checkpoint -> fp32 and int4 artifacts.

Each export runs `python -m export build` in its own subprocess, so its peak RSS (ru_maxrss of
that child) and wall time are its own. The stage timings come from the artifact's manifest.
Targets, fp32: <= 90 s and peak RSS <= 2.5x the weight bytes (issue 3); the parity gate cheaper
than the export and peak RSS <= 2x the weights (issue 15). The gate runs as in any build
(`--no-verify` is not used) and its time is listed separately, with each of its phases (the
reference side, each session, each check: seconds, RSS and peak RSS at its end, from the manifest).

    .venv/bin/python benchmarks/export_bench.py [--ckpt benchmarks/cache/full-ckpt] [--precisions fp32 int4]

The checkpoint is made with `python -m reference.factory --size full` when missing (about 2 GB;
the same folder `make bench` uses).
Prints a table and writes benchmarks/results/export.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import CACHE, RESULTS, ROOT, child_env, ensure_full_checkpoint, log, text_table, weight_bytes, write_json

OUT_JSON = RESULTS / "export.json"  # --no-verify runs go to export-noverify.json

_CHILD = r"""
import resource, runpy, sys
sys.argv = ["export"] + sys.argv[1:]
try:
    runpy.run_module("export", run_name="__main__")
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def export_once(ckpt: Path, out: Path, precision: str, code: str, verify: bool = True) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _CHILD, "build", "--model", str(ckpt), "--out", str(out),
                          "--code", code, "--precision", precision, "--force", *([] if verify else ["--no-verify"])],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kb = next((int(l.split()[1]) for l in res.stderr.splitlines() if l.startswith("PEAK_RSS_KB")), 0)
    row = {"precision": precision, "code": code, "verify": verify, "ok": res.returncode == 0, "wall_s": round(wall, 1),
           "peak_rss_bytes": peak_kb * 1024}
    if res.returncode != 0:
        row["error"] = res.stderr.strip().splitlines()[-2:] if res.stderr.strip() else []
        return row
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stage_seconds"]
    row["stages_s"] = stages
    row["export_s"] = round(sum(v for k, v in stages.items() if k != "verify"), 1)
    row["verify_s"] = stages.get("verify")
    row["artifact_bytes"] = sum(e["size"] for e in manifest["files"].values())
    row["parity"] = {c["name"]: c["value"] for c in manifest["parity"].get("checks", [])}
    row["gate_phases"] = manifest["parity"].get("phases", [])  # reference side, sessions, checks: s and RSS
    return row


def phase_table(row: dict) -> str:
    """The build's stages, then the gate's phases in order: seconds, RSS and peak RSS at the phase's end
    (the phase where the peak column grows is the one that set the build's peak)."""
    rows = [(f"stage: {k}", f"{v:.1f}", "", "") for k, v in row.get("stages_s", {}).items()]
    rows += [(p["name"], f"{p['seconds']:.1f}", f"{p['rss_bytes'] / 1e9:.2f}", f"{p['peak_rss_bytes'] / 1e9:.2f}")
             for p in row.get("gate_phases", [])]
    return text_table(["phase", "s", "RSS GB", "peak GB"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(CACHE / "full-ckpt"))
    p.add_argument("--out", default=str(CACHE / "export"))
    p.add_argument("--precisions", nargs="+", default=["fp32", "int4"])
    p.add_argument("--code", default="arith")
    p.add_argument("--no-verify", action="store_true", help="export only: peak RSS without the gate's ORT session")
    p.add_argument("--keep", action="store_true", help="keep the artifacts (deleted otherwise)")
    args = p.parse_args(argv)
    ckpt = ensure_full_checkpoint(Path(args.ckpt))
    wb = weight_bytes(ckpt)
    rows = []
    for prec in args.precisions:
        row = export_once(ckpt, Path(args.out) / f"full-{args.code}-{prec}", prec, args.code, not args.no_verify)
        row["rss_over_weights"] = round(row["peak_rss_bytes"] / wb, 2)
        rows.append(row)
        log(json.dumps(row))
        if not args.keep:
            shutil.rmtree(Path(args.out) / f"full-{args.code}-{prec}", ignore_errors=True)
    print(f"full-size export (weights {wb / 1e9:.2f} GB, {os.cpu_count()} CPUs)")
    print(text_table(["precision", "ok", "export s", "verify s", "wall s", "peak RSS GB", "x weights"],
                     [(r["precision"], r["ok"], r.get("export_s", "-"), r.get("verify_s") or "-", r["wall_s"],
                       f"{r['peak_rss_bytes'] / 1e9:.2f}", r["rss_over_weights"]) for r in rows]))
    for r in rows:
        if r.get("verify_s") is not None:
            print(f"{r['precision']}: gate {'<' if r['verify_s'] < r['export_s'] else '>='} export; "
                  f"peak {r['rss_over_weights']}x the weights ({'<=' if r['rss_over_weights'] <= 2 else '>'} 2x)")
    for r in rows:
        if r.get("gate_phases") or r.get("stages_s"):
            print(f"\n{r['precision']}: stages and gate phases")
            print(phase_table(r))
    results = OUT_JSON.with_name("export-noverify.json") if args.no_verify else OUT_JSON
    write_json(results, {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                         "weight_bytes": wb, "targets": {"fp32_s": 90, "fp32_rss_x": 2.5, "gate_lt_export": True, "rss_x": 2.0}, "runs": rows})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
