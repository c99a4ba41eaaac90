"""One MatMulNBits node of the full-size model, timed alone: why int4 prefill trails int8 (issue 20.2).

bench-peers measured the runtime's int4 prefill below its own int8 prefill and below OpenVINO on the
same int4 artifact. Decode (M = 1) and prefill (M = 128) run different MLAS kernels, so this times
ONNX Runtime's MatMulNBits at the model's shapes for each bits / block_size / accuracy_level, with
random packed weights (speed does not depend on their values), 2 threads.

    python benchmarks/nbits_kernel.py            # prints a table, writes results/nbits_kernel.json
"""
from __future__ import annotations

import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from common import RESULTS, THREADS, markdown_table, write_json

SHAPES = ((1024, 4096), (4096, 1024))  # (K, N): the MLP's up and down projections


def session(K: int, N: int, bits: int, block: int, acc: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    nblk = K // block
    w = rng.integers(0, 256, size=(N, nblk, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(N * nblk, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=acc)
    g = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def best_ms(sess: ort.InferenceSession, M: int, K: int, reps: int) -> float:
    x = np.random.default_rng(1).standard_normal((M, K), dtype=np.float32)
    sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> int:
    rows, out = [], []
    for bits, block in ((8, 128), (4, 256), (4, 128), (4, 64), (4, 32)):
        for acc in (4, 0):
            r = {"bits": bits, "block_size": block, "accuracy_level": acc}
            for K, N in SHAPES:
                s = session(K, N, bits, block, acc)
                r[f"M128_{K}x{N}_ms"] = best_ms(s, 128, K, 10)
                r[f"M1_{K}x{N}_ms"] = best_ms(s, 1, K, 50)
            out.append(r)
            rows.append([bits, block, acc] + [f"{r[k]:.3f}" for k in r if k.endswith("_ms")])
    hdr = ["bits", "block", "accuracy_level"] + [k for k in out[0] if k.endswith("_ms")]
    print(markdown_table(hdr, rows))
    write_json(RESULTS / "nbits_kernel.json", {"ort": ort.__version__, "threads": THREADS, "rows": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
