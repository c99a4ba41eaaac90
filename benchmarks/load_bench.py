"""What integrity by default costs at load: `runtime.load` of one artifact, timed in fresh processes.

Side by side in one run, rounds interleaved (medians; this machine's disk and memory bandwidth move
between rounds): the runtime at a git revision from before integrity was checked by default (its
default `verify="size"`), and this checkout's runtime with its default (sha256 of every file, with
the verified-stamp cache) on a first load (empty stamp cache) and a repeated load, and with
`verify="none"`. Each load runs in a new process after `import onnxruntime`, so the page cache is
warm for all of them alike and only the load itself is timed.

    python benchmarks/load_bench.py ARTIFACT --before REV [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, child_env, text_table, write_json

CODE = ("import time, sys, onnxruntime, runtime; t = time.perf_counter(); "
        "runtime.load(sys.argv[1], provider='cpu'{extra}); print(time.perf_counter() - t)")
CASES = {  # name -> (which checkout, extra load arguments, fresh stamp cache?)
    "before: default (verify='size')": ("before", "", True),
    "now: default, first load": ("now", "", True),
    "now: default, repeated load": ("now", "", False),
    "now: verify='none'": ("now", ", verify='none'", False),
}


def load_seconds(root: Path, artifact: Path, cache: str, extra: str) -> float:
    env = child_env(TABLEFREE_CACHE=cache, PYTHONPATH=str(root))
    p = subprocess.run([sys.executable, "-c", CODE.format(extra=extra), str(artifact)], env=env, cwd="/",
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"load failed under {root}:\n{p.stderr[-2000:]}")
    return float(p.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--before", required=True, help="git revision whose runtime is the 'before' column")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.before], check=True)
        try:
            times: dict[str, list[float]] = {name: [] for name in CASES}
            for _ in range(args.rounds):
                cache = tempfile.mkdtemp(dir=tmp)
                for name, (which, extra, fresh) in CASES.items():
                    if fresh:
                        cache = tempfile.mkdtemp(dir=tmp)
                    times[name].append(load_seconds(old if which == "before" else ROOT, args.artifact, cache, extra))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    size = sum(p.stat().st_size for p in args.artifact.iterdir())
    base = statistics.median(times[next(iter(CASES))])
    rows = [[name, f"{statistics.median(v) * 1e3:.0f}", f"{min(v) * 1e3:.0f}", f"{statistics.median(v) / base:.2f}"]
            for name, v in times.items()]
    print(f"{args.artifact} ({size / 1e9:.2f} GB), {args.rounds} interleaved rounds, before = {args.before}")
    print(text_table(["load", "median ms", "min ms", "ratio to before"], rows))
    write_json(RESULTS / "load.json", {"artifact": str(args.artifact), "bytes": size, "before": args.before,
                                       "rounds": args.rounds, "seconds": times})


if __name__ == "__main__":
    main()
