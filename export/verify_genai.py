"""Gate check for model.genai.onnx (graphs/genai_kv.py): run it with plain ONNX Runtime the way
onnxruntime-genai does, and compare its logits with expected ones.

Why here and not only in the genai venv test: the build has no onnxruntime-genai, but it can feed
the graph exactly what genai feeds with past_present_share_buffer = true: one zeroed
[1, heads, max_len, head_size] OrtValue per cache tensor bound as BOTH past_key_values.{i}.* and
present.{i}.* (so GroupQueryAttention writes in place), attention_mask = ones of the cache length
after the step, a prompt chunk first, then one token per step (teacher forcing).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.interface import ATTENTION_MASK, CONFIG_FILE, INPUT_IDS, LOGITS, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE


class GenaiKvMismatch(AssertionError):
    pass


def genai_kv_logits(folder: str | Path, ids: Sequence[int], prompt_len: int, graph: str = "model.genai.onnx",
                    max_len: int | None = None) -> np.ndarray:
    """Logits [len(ids), V] of the genai variant: ids[:prompt_len] in one run, then one token per run."""
    import onnxruntime as ort

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    heads, layers = int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
    hs = int(cfg["hidden_size"]) // heads
    max_len = int(max_len or cfg["max_position_embeddings"])
    if not 0 < prompt_len <= len(ids) <= max_len:
        raise ValueError(f"need 0 < prompt_len ({prompt_len}) <= len(ids) ({len(ids)}) <= max_len ({max_len})")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / graph), so, providers=["CPUExecutionProvider"])
    caches = {}
    # the cache's type is the graph's: float16 in an fp16 artifact, as genai allocates it
    ctype = next(i.type for i in sess.get_inputs() if i.name == PAST_KEY.format(i=0))
    dtype = np.float16 if ctype == "tensor(float16)" else np.float32
    for i in range(layers):
        for past, present in ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)):
            buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, max_len, hs), dtype))
            caches[past.format(i=i)] = (present.format(i=i), buf)
    rows, pos = [], 0
    for chunk in [list(ids[:prompt_len])] + [[t] for t in ids[prompt_len:]]:
        io = sess.io_binding()
        io.bind_cpu_input(INPUT_IDS, np.array([chunk], np.int64))
        io.bind_cpu_input(ATTENTION_MASK, np.ones((1, pos + len(chunk)), np.int64))
        io.bind_output(LOGITS)  # first, so it is output 0 below
        for past, (present, buf) in caches.items():
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)
        sess.run_with_iobinding(io)
        rows.append(io.copy_outputs_to_cpu()[0][0])
        pos += len(chunk)
    return np.concatenate(rows, axis=0)


def check_genai_kv(folder: str | Path, ids: Sequence[int], expected_logits: np.ndarray, tol: float,
                   prompt_len: int | None = None) -> float:
    """Max |logits - expected| of model.genai.onnx on `ids` (teacher forcing after a prompt of
    `prompt_len` tokens, default half); raises GenaiKvMismatch naming the first bad position when
    it exceeds `tol`. `expected_logits` is [len(ids), V] from the full-sequence forward."""
    expected = np.asarray(expected_logits, np.float32)
    got = genai_kv_logits(folder, ids, prompt_len or max(1, len(ids) // 2))
    if got.shape != expected.shape:
        raise GenaiKvMismatch(f"model.genai.onnx gave logits {got.shape}, expected {expected.shape}")
    diff = np.abs(got - expected).max(axis=-1)
    if diff.max() > tol:
        bad = int(np.argmax(diff > tol))
        raise GenaiKvMismatch(f"model.genai.onnx logits differ by {diff.max():.3g} (> {tol:.3g}) from position {bad}; "
                              "re-export, or report the graph rewrite (graphs/genai_kv.py) as a bug")
    return float(diff.max())


__all__ = ["genai_kv_logits", "check_genai_kv", "GenaiKvMismatch"]
