"""The gate's CUDA readiness check (`--provider cuda`): before any CUDA session opens, every node of
the graphs the runtime opens on CUDA has a CUDA kernel, none is forced to the CPU, and the
GroupQueryAttention / MatMulNBits limits hold (graphs/cuda_check.py, from ONNX Runtime's own
kernel table and source).

Why before the sessions: the gate runs CUDA with the CPU provider beside it, so a node without a
CUDA kernel would pass there and fail in the runtime, which disables CPU fallback on CUDA. And the
check needs no GPU, so a CPU-only build with `--provider cuda` is checked too.
"""
from __future__ import annotations

from pathlib import Path

from graphs.cuda_check import check_model, table_source
from graphs.genai_kv import GENAI_KV_MODEL_FILE
from runtime.interface import KV_MODEL_FILE, MODEL_FILE

from .errors import ExportError


def cuda_graphs(folder: Path, precision: str) -> list[tuple[str, bool]]:
    """(file, CPU nodes allowed) of the graphs that run on CUDA: model.onnx always; the shared-cache
    graphs of fp16 artifacts only (the runtime takes model.onnx of the others on CUDA: ONNX Runtime's
    CUDA GroupQueryAttention is float16/bfloat16). onnxruntime-genai keeps CPU fallback on."""
    names = [(MODEL_FILE, False)]
    if precision == "fp16":
        names += [(KV_MODEL_FILE, False), (GENAI_KV_MODEL_FILE, True)]
    return [(n, allow) for n, allow in names if (folder / n).is_file()]


def check_cuda_ready(folder: Path, precision: str) -> str:
    """One summary line, or ExportError naming the first node that would not run on CUDA."""
    counts = []
    for name, allow_cpu in cuda_graphs(Path(folder), precision):
        rep = check_model(Path(folder) / name)
        problems = rep.problems(allow_cpu)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ExportError(f"--provider cuda: {name}: {problems[0]}{more}; by ONNX Runtime's CUDA kernel table "
                              f"({table_source()}); export with --provider cpu, or see docs/cuda.md")
        counts.append(f"{name} {sum(rep.placed.values())} nodes")
    return f"CUDA readiness: {', '.join(counts)} all on CUDA kernels (table: {table_source()})"
