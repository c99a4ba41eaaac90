"""First run on a GPU: where each node of each graph lands, against what the CUDA check predicted.

No GPU has been lent to this project yet; the CUDA readiness check (graphs/cuda_check.py) reads
ONNX Runtime's kernel table and source instead. The first session on a GPU should record what
ORT actually did, so that the table can be corrected where it was wrong:

    python benchmarks/cuda_first_run.py --artifact DIR [--artifact DIR ...] --out cuda_first_run.json

For every graph of each artifact (model.onnx, model.kv.onnx, model.genai.onnx) it opens
1. a session with CPU fallback disabled (what the runtime does): opened, or ORT's error line;
2. a session with fallback allowed, verbose logging and profiling, runs one left-padded batch
   through it (model.onnx) and writes each node's provider from the profile, plus ORT's
   "Force fallback to CPU" / "Node placements" log lines;
and beside them the check's prediction for the same file. Without onnxruntime-gpu it writes
only the predictions and says so (exit 0: the script is runnable everywhere).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphs.cuda_check import check_model, table_source  # noqa: E402

CUDA_EP = "CUDAExecutionProvider"
GRAPHS = ("model.onnx", "model.kv.onnx", "model.genai.onnx")


def _feed(sess) -> dict:
    """A 2-row left-padded prompt and an empty cache for model.onnx."""
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int64)
    feed = {"input_ids": np.ones_like(mask), "attention_mask": mask,
            "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feed[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), dtype)
    return feed


def _placements(ort, path: Path, run: bool) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 1  # INFO: ORT logs "Force fallback to CPU execution for node" there
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        sess = ort.InferenceSession(str(path), so, providers=[CUDA_EP, "CPUExecutionProvider"])
        if run:
            sess.run(None, _feed(sess))
        prof = sess.end_profiling()
    nodes: dict[str, str] = {}
    for ev in json.loads(Path(prof).read_text()):
        if ev.get("cat") == "Node" and "provider" in ev.get("args", {}):
            nodes[ev["name"].removesuffix("_kernel_time")] = ev["args"]["provider"]
    log = [ln for ln in captured.getvalue().splitlines() if "fallback" in ln.lower() or "placement" in ln.lower()]
    return {"providers": sess.get_providers(), "ran": run, "node_provider": nodes,
            "off_cuda": sorted(n for n, p in nodes.items() if p != CUDA_EP), "ort_log": log[:200]}


def _strict(ort, path: Path) -> str:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(str(path), so, providers=[CUDA_EP])
        return "opened"
    except Exception as e:
        return f"refused: {str(e).splitlines()[0][:400]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", action="append", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=Path("cuda_first_run.json"))
    a = ap.parse_args(argv)
    try:
        import onnxruntime as ort
        has_cuda = CUDA_EP in ort.get_available_providers()
        version = ort.__version__
    except ImportError:
        ort, has_cuda, version = None, False, None
    out = {"onnxruntime": version, "cuda_available": has_cuda, "table": table_source(), "graphs": {}}
    for folder in a.artifact:
        for name in GRAPHS:
            path = folder / name
            if not path.is_file():
                continue
            rep = check_model(path)
            row = {"predicted": {"missing": rep.missing, "cpu_nodes": rep.cpu_nodes, "limits": rep.limits}}
            if has_cuda:
                row["strict_session"] = _strict(ort, path)
                row["placement"] = _placements(ort, path, run=name == "model.onnx")
            out["graphs"][str(path)] = row
            print(f"{path}: predicted {'ok' if rep.ok(name.endswith('genai.onnx')) else 'problems'}"
                  + (f"; strict session {row['strict_session']}; off CUDA {len(row['placement']['off_cuda'])}"
                     if has_cuda else ""))
    if not has_cuda:
        print("no CUDAExecutionProvider here: wrote the predictions only (run this on a GPU with onnxruntime-gpu)")
    tmp = a.out.with_name(a.out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
