"""Opening ONNX Runtime sessions: the import, the providers, the session options, the CPU fallback.

provider="cuda" means CUDA or an error; "auto" means CUDA when it works, else the CPU with one
warning per process (not one per load: a server that loads ten models should say it once).
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

from .errors import MissingDependencyError, ProviderError, RuntimeArtifactError

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda")

_warned_fallback = False
_warn_lock = threading.Lock()


def import_ort() -> Any:
    """onnxruntime is an extra (cpu or gpu wheel); say which one to install when it is missing."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            "onnxruntime is not installed: pip install 'tablefree-onnx[cpu]' (CPU) or "
            "'tablefree-onnx[gpu]' (onnxruntime-gpu, for CUDA); never both"
        ) from None
    return onnxruntime


def cuda_available(ort: Any) -> bool:
    return CUDA_EP in ort.get_available_providers()


CUDA_INT4_BLOCKS = (16, 32, 64, 128)  # ORT's CUDA 4-bit one-row MatMulNBits (matmul_4bits.cu) throws for others


def cuda_block_problem(manifest: dict) -> str | None:
    """Why this artifact's int4 weights cannot run on ONNX Runtime's CUDA provider, or None.

    The session would open (the kernel exists) and then every batch-1 decode step would throw in
    the CUDA 4-bit kernel; the runtime says so before opening instead."""
    q = manifest.get("quantization") or {}
    block, bits = q.get("block_size"), q.get("bits", 4 if manifest.get("precision") == "int4" else None)
    if manifest.get("precision") != "int4" or bits != 4 or block in CUDA_INT4_BLOCKS or block is None:
        return None
    return (f"its int4 weights use MatMulNBits block {block}, and ONNX Runtime's CUDA 4-bit kernel runs one row "
            f"(every batch-1 decode step) only for blocks {'/'.join(map(str, CUDA_INT4_BLOCKS))}: re-export with "
            "--provider cuda (block 128)")


def warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    with _warn_lock:
        if _warned_fallback:
            return
        _warned_fallback = True
    warnings.warn(f"provider='auto': {reason}; running on the CPU", RuntimeWarning, stacklevel=4)


def session_options(ort: Any, threads: int | None, cuda: bool) -> Any:
    """threads was checked by inputs.check_load_args (an int >= 1 or None)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only; ORT's warnings go to stderr unasked otherwise
    if cuda:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def open_session(ort: Any, model_path: Path, provider: str, threads: int | None,
                 lift_mode: str | None = None) -> tuple[Any, str]:
    """(session, device) with device "cpu" or "cuda": where inputs, outputs and the cache live.

    cuda demanded -> CUDA or a ProviderError; auto -> CUDA if the whole graph runs there, else the
    CPU and one warning."""
    available = ort.get_available_providers()
    if provider == "cuda" and CUDA_EP not in available:
        raise ProviderError(
            f"provider='cuda' but this onnxruntime has no CUDA provider (it has {', '.join(available)}): "
            "install onnxruntime-gpu (pip install 'tablefree-onnx[gpu]', after uninstalling onnxruntime)"
        )
    if provider in ("cuda", "auto") and CUDA_EP in available:
        try:
            # CUDA alone: ORT refuses the CPU provider in the list once CPU fallback is disabled
            sess = ort.InferenceSession(str(model_path), session_options(ort, threads, cuda=True),
                                        providers=[CUDA_EP])
            if sess.get_providers()[0] == CUDA_EP:
                return sess, "cuda"
            reason = "the CUDA provider did not load (check the CUDA and cuDNN libraries onnxruntime-gpu needs)"
        except Exception as e:  # a node without a CUDA kernel, with CPU fallback disabled
            hint = ("this artifact's bitwise lift has CPU kernels only: re-export with --code arith or lookup"
                    if lift_mode == "bitwise" else "re-export with --code arith, whose operators run on every provider")
            reason = f"the graph cannot run wholly on CUDA ({_first_line(e)}); {hint}"
        if provider == "cuda":
            raise ProviderError(f"provider='cuda': {reason}")
        warn_fallback_once(reason)
    elif provider == "auto":
        warn_fallback_once("onnxruntime has no CUDA provider (install onnxruntime-gpu for GPUs)")
    try:
        sess = ort.InferenceSession(str(model_path), session_options(ort, threads, cuda=False), providers=[CPU_EP])
    except Exception as e:
        raise RuntimeArtifactError(f"ONNX Runtime cannot open {model_path}: {_first_line(e)}; "
                                   "re-export or re-download the folder") from None
    return sess, "cpu"
