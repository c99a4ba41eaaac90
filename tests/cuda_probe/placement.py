"""Where onnxruntime-gpu's own partitioner puts each node of a model, on a machine with no GPU.

Run with the probe venv's python (`make setup-cudaprobe`: onnxruntime-gpu and its CUDA libraries)
and the stand-in device of build.sh preloaded; `run_probe` in tests/test_cuda_partitioner.py does
both. For each model it opens a session the way the runtime does on CUDA (ORT_ENABLE_ALL, CUDA
provider alone) in a child process with ORT's verbose log, and reads ORT's "Node placements"
report (ORT prints it only when CPU fallback is allowed; with fallback disabled, as the runtime opens
CUDA sessions, the same session is refused exactly when that report has CPU nodes): the real answer to "which node would leave the GPU", from the same code
a GPU session runs, up to the point where a GPU would start computing.

    python placement.py MODEL.onnx [MODEL.onnx ...]   # prints one JSON object: {model: report}
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

_PLACED = re.compile(r"Node\(s\) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_ALL = re.compile(r"All nodes placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3,}(\S+) \((.*)\)\s*$")


def _open(model: str) -> None:
    import onnxruntime as ort

    ort.preload_dlls()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 0
    so.log_verbosity_level = 0
    try:
        ort.InferenceSession(model, so, providers=["CUDAExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - the stand-in device fails after placement, by design
        print("SESSION-ERROR " + str(e).replace("\n", " ")[:500], file=sys.stderr)


def report(model: str) -> dict:
    """{"version", "providers": {ep: node count}, "cpu_nodes": ["Op (name)", ...]}."""
    res = subprocess.run([sys.executable, __file__, "--child", model], capture_output=True, text=True, timeout=300)
    import onnxruntime as ort

    out: dict = {"version": ort.__version__, "providers": {}, "cpu_nodes": []}
    current = None
    for line in res.stderr.splitlines():
        if m := _ALL.search(line):
            out["providers"][m.group(1)] = int(m.group(2))
            current = None
        elif m := _PLACED.search(line):
            out["providers"][m.group(1)] = int(m.group(2))
            current = m.group(1)
        elif (m := _NODE.search(line)) and current == "CPUExecutionProvider":
            out["cpu_nodes"].append(f"{m.group(1)} ({m.group(2)})")
    if not out["providers"]:
        raise SystemExit(f"no placement report for {model}; ORT said:\n{res.stderr[-2000:]}")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _open(sys.argv[2])
    else:
        print(json.dumps({m: report(m) for m in sys.argv[1:]}))
