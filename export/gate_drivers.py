"""The gate's two ONNX Runtime drivers: `OrtLM` runs model.onnx with pasts in and presents out,
`KvLM` runs the shared-cache graph (model.kv.onnx) with IO binding, each with a greedy loop.

Deliberately minimal and local (numpy in, numpy out): the gate must not trust the runtime package
it is checking the artifact for; `runtime/` has the full loop."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from reference.config import ModelConfig
from runtime.interface import (ATTENTION_MASK, INPUT_IDS, KV_MODEL_FILE, LOGITS, LOGITS_TO_KEEP, MODEL_FILE,
                               POSITION_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, past_names, present_names)

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtLM:
    """The artifact as a plain function: numpy ids/mask/positions/past in, numpy logits/present out."""

    def __init__(self, folder: Path, num_layers: int, heads: int, head_size: int, providers: list[str]):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(Path(folder) / MODEL_FILE), so, providers=providers)
        self.L, self.H, self.hs = num_layers, heads, head_size
        types = {i.name: i.type for i in self.sess.get_inputs()}
        self.kv_dtype = _ORT_FLOAT.get(types.get(past_names(num_layers)[0], "tensor(float)"), np.float32)
        self.in_names, self.out_names = past_names(num_layers), [LOGITS, *present_names(num_layers)]
        self.has_keep = LOGITS_TO_KEEP in {i.name for i in self.sess.get_overridable_initializers()}

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.H, 0, self.hs), self.kv_dtype) for _ in range(2 * self.L)]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray] | None = None,
                 keep: int = 0):
        past = self.empty_past(ids.shape[0]) if past is None else past
        feed = {INPUT_IDS: ids.astype(np.int64), ATTENTION_MASK: mask.astype(np.int64), POSITION_IDS: pos.astype(np.int64)}
        if keep:
            feed[LOGITS_TO_KEEP] = np.array([keep], np.int64)
        feed.update(zip(self.in_names, past))
        out = self.sess.run(self.out_names, feed)
        return out[0].astype(np.float32), out[1:]


class KvLM:
    """The artifact's shared-cache graph (KV_MODEL_FILE) driven with plain IO binding: `prefill(ids
    [B, S], lengths)` with right-padded rows, then `step(tokens [B])` in lock step; both return
    logits [B, S or 1, V] as numpy."""

    def __init__(self, folder: Path, num_layers: int, heads: int, head_size: int, providers: list[str],
                 max_len: int, batch: int = 1, session: ort.InferenceSession | None = None):
        if session is None:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            session = ort.InferenceSession(str(Path(folder) / KV_MODEL_FILE), so, providers=providers)
        self.sess = session  # pass one in to size new buffers without reloading the weights
        types = {i.name: i.type for i in self.sess.get_inputs()}
        dtype = _ORT_FLOAT.get(types[past_names(num_layers)[0]], np.float32)
        shape = (batch, heads, max_len, head_size)
        self.host = [np.zeros(shape, dtype) for _ in range(2 * num_layers)]
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in self.host]
        self.pairs = list(zip(past_names(num_layers), present_names(num_layers), self.buffers))
        self.lengths = np.zeros(batch, np.int32)

    def _run(self, ids: np.ndarray, seqlens: np.ndarray, total: int) -> np.ndarray:
        b = self.sess.io_binding()
        b.bind_cpu_input(INPUT_IDS, ids.astype(np.int64))
        b.bind_cpu_input(SEQLENS_K, seqlens.astype(np.int32))
        b.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(total, np.int32))
        b.bind_output(LOGITS, "cpu")  # first: get_outputs() lists outputs in the order they were bound
        for past, present, buf in self.pairs:
            b.bind_ortvalue_input(past, buf)
            b.bind_ortvalue_output(present, buf)
        self.sess.run_with_iobinding(b)
        return b.get_outputs()[0].numpy().astype(np.float32)

    def prefill(self, ids: np.ndarray, lengths: list[int] | None = None) -> np.ndarray:
        lens = np.full(ids.shape[0], ids.shape[1], np.int32) if lengths is None else np.asarray(lengths, np.int32)
        out = self._run(ids, lens - 1, ids.shape[1])
        self.lengths = lens.copy()
        return out

    def step(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64).reshape(-1, 1)
        out = self._run(tokens, self.lengths, int(self.lengths.max()) + 1)
        self.lengths += 1
        return out


def kv_greedy(folder: Path, cfg: ModelConfig, providers: list[str], rows: list[list[int]], steps: int,
              pad_id: int, tick: Callable[..., None] | None = None,
              session: ort.InferenceSession | None = None) -> list[list[int]]:
    """Greedy decoding of right-padded rows on the shared-cache graph, all rows in lock step, in
    fresh cache buffers (on `session` when given: the gate opens the graph once)."""
    S = max(len(r) for r in rows)
    ids = np.full((len(rows), S), pad_id, np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    kv = KvLM(folder, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size, providers, S + steps, len(rows),
              session)
    logits = kv.prefill(ids, [len(r) for r in rows])
    nxt = logits[np.arange(len(rows)), [len(r) - 1 for r in rows]].argmax(-1)
    out: list[list[int]] = [[int(t)] for t in nxt]
    for _ in range(steps - 1):
        nxt = kv.step(nxt)[:, -1].argmax(-1)
        for i, t in enumerate(nxt):
            out[i].append(int(t))
        if tick is not None:
            tick(1, "kv graph batch")
    return out


def positions(mask: np.ndarray) -> np.ndarray:
    """Positions count attended tokens only, so a left-padded row sees what it sees alone."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)



def ort_greedy(m: OrtLM, rows: list[list[int]], steps: int, pad_id: int = 0,
               tick: Callable[..., None] | None = None) -> list[list[int]]:
    """Greedy decoding of left-padded rows through the KV cache (prefill once, then one token a step)."""
    B, T = len(rows), max(len(r) for r in rows)
    ids = np.full((B, T), pad_id, np.int64)
    mask = np.zeros((B, T), np.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    logits, past = m(ids, mask, positions(mask))
    out: list[list[int]] = [[] for _ in rows]
    for step in range(steps):
        nxt = logits[:, -1].argmax(-1)
        for i in range(B):
            out[i].append(int(nxt[i]))
        if tick is not None:
            tick(1, "greedy")
        if step == steps - 1:
            break
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        logits, past = m(nxt[:, None], mask, positions(mask)[:, -1:], past)
    return out

