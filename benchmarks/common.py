"""What the benchmark scripts share: paths, the project on sys.path, peak RSS, child processes, tables, JSON.

Every script in benchmarks/ starts with `import common`. Python puts the script's own folder
first on sys.path, so this module is found without installing anything, and importing it puts the
project root on sys.path once (so `runtime`, `reference` and `export` import from this checkout).
Measurements that need their own peak RSS run in child processes; `child_env` gives those the
same view of the project through PYTHONPATH.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CACHE = BENCH / "cache"  # gitignored: full-size checkpoints and artifacts, built once
RESULTS = BENCH / "results"  # committed: the JSON (and chart) each benchmark writes
THREADS = 2  # every figure in RESULTS.md is batch 1 on this machine's 2 cores

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# Instruction sets the CPU kernels pick paths by (MLAS int8 with VNNI, oneDNN bf16, AVX-512 GEMMs):
# the same code is several times faster or slower across them, so every result names its CPU's.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU a result was measured on: model name, family/model, the ISA_FLAGS it has (Linux /proc/cpuinfo)."""
    import platform

    info: dict = {"arch": platform.machine(), "nproc": os.cpu_count()}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update(model_name=fields.get("model name"), family=fields.get("cpu family"), model=fields.get("model"),
                isa=[f for f in ISA_FLAGS if f in flags])
    return info


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the table (or a worker's JSON line)."""
    print(msg, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """VmHWM of this process: the peak resident set, which is what a user's machine must hold.

    Falls back to ru_maxrss where /proc is missing (not Linux).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_bytes(folder: Path) -> int:
    """Bytes of a checkpoint folder's safetensors files (the denominator of every RSS ratio)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a measurement's child process: this checkout first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_json(cmd: Sequence[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child that prints one JSON object as its last stdout line; that object, or exit with its stderr."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, env=env or child_env(), cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    lines = res.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"{what} printed no result:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def ensure_full_checkpoint(folder: Path) -> Path:
    """The full-size (0.47B, about 1.9 GB) synthetic checkpoint at `folder`, written once by the factory."""
    if (folder / "config.json").is_file() and weight_bytes(folder) > 0:
        return folder
    log(f"writing the full-size synthetic checkpoint to {folder} (once; cached)")
    subprocess.run([sys.executable, "-m", "reference.factory", "--out", str(folder), "--size", "full"],
                   check=True, cwd=ROOT, env=child_env())
    return folder


def write_json(path: Path, obj: Any) -> Path:
    """Write results atomically (temp file, then rename), so an interrupted run leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell: numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def numeric(c: str) -> bool:
        try:
            float(c.rstrip("%x"))
            return True
        except ValueError:
            return False

    right = [all(numeric(r[i]) or r[i] == "-" for r in cells[1:]) and len(cells) > 1 for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if al else c.ljust(w) for c, w, al in zip(r, widths, right)).rstrip()
                     for r in cells)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub table, as RESULTS.md holds them."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["ROOT", "BENCH", "CACHE", "RESULTS", "THREADS", "log", "peak_rss_bytes", "weight_bytes", "child_env",
           "run_json", "ensure_full_checkpoint", "write_json", "text_table", "markdown_table"]
