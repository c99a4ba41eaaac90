"""The server's KV cache: B slots of the shared-buffer graph (model.kv.onnx), one request per slot.

Each layer's cache is one C-contiguous [B, kv_heads, max_len, head_size] array that is bound as
both past and present (GroupQueryAttention then writes only the new positions, graphs/gqa.py).
Row b of such an array is contiguous, and so are rows 0..k-1, so ONNX Runtime can be pointed at
them by raw pointer without a copy:

- `prefill_rows(start, prompts)` runs new prompts, right-padded, on rows start.. alone
  (seqlens_k[b] = len_b - 1, total_sequence_length = S: GQA's "first prompt" case), whatever the
  other rows hold; `extend(slot, ids)` adds a chunk to one row's prompt (a long prompt goes in
  pieces between decode steps), and `extend_all` does the same returning every position's logits
  (prompt log-probabilities);
- `step(tokens)` runs one decode step on rows 0..k-1 at once, each at its own length
  (seqlens_k[b] = length_b, total = max + 1), as `Model.generate`'s lock-step batch does.

The scheduler keeps the active requests in rows 0..k-1 (`move` compacts a hole left by a request
that finished), so a step never computes rows nobody reads.

This file is the only one that reaches into the runtime's `Model` for ONNX Runtime, and only in
`SlotCache.from_model`, through two attributes: `kv_session` (the onnxruntime session of
model.kv.onnx) and `info` (ArtifactInfo: vocab size, layers, context length, folder). The rest of
runtime/serve uses `model.tokenizer` and `model.info` besides. Everything else (cache dtype, kv
heads, head size, logits_to_keep) is read from the session itself, so after the runtime's split
into modules only `from_model` may need re-pointing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import interface as I

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SlotCache:
    """B cache rows on the CPU; not thread-safe (one scheduler thread owns it)."""

    def __init__(self, session: Any, vocab_size: int, num_layers: int, max_batch: int, max_len: int):
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_len ({max_len}) must be >= 1")
        self.sess = session
        self.batch, self.max_len, self.vocab_size = int(max_batch), int(max_len), int(vocab_size)
        self._past = I.past_names(num_layers)
        self._present = I.present_names(num_layers)
        ins = {i.name: i for i in session.get_inputs()}
        first = ins[self._past[0]]
        if first.type not in _DTYPES:
            raise ValueError(f"model.kv.onnx cache type {first.type} is not float or float16")
        self.dtype = np.dtype(_DTYPES[first.type])
        _, heads, _, head_size = first.shape
        self.heads, self.head_size = int(heads), int(head_size)
        self.has_keep = I.LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
        shape = (self.batch, self.heads, self.max_len, self.head_size)
        # np.zeros maps zero pages lazily: untouched positions of idle slots cost no memory
        self.buffers = [np.zeros(shape, self.dtype) for _ in self._past]
        self.row_bytes = self.heads * self.max_len * self.head_size * self.dtype.itemsize
        self.lengths = np.zeros(self.batch, np.int32)  # tokens in each row's cache
        self.logits = np.zeros((self.batch, 1, self.vocab_size), np.float32)
        import onnxruntime as ort  # the session exists, so the module does

        self._keep = np.ones(1, np.int64)
        self._keep_value = ort.OrtValue.ortvalue_from_numpy(self._keep)  # over self._keep's memory
        self._decode = session.io_binding()
        self._decode_rows = 0  # rows the decode binding is bound to (re-bound when it changes)

    @classmethod
    def from_model(cls, model: Any, max_batch: int, max_len: int | None = None) -> "SlotCache":
        """Slots for a loaded runtime Model (needs `model.kv_session` and `model.info`)."""
        if getattr(model, "kv_session", None) is None:
            raise ValueError(f"{model.info.folder} has no {I.KV_MODEL_FILE} session: serving needs the shared-cache "
                             "graph; re-export with a current `python -m export build` and load on the CPU")
        ctx = model.info.context_length
        return cls(model.kv_session, model.info.vocab_size, model.info.num_layers, max_batch,
                   ctx if max_len is None else min(int(max_len), ctx))

    def _bind_rows(self, binding: Any, start: int, count: int) -> None:
        shape = [count, self.heads, self.max_len, self.head_size]
        for past, present, buf in zip(self._past, self._present, self.buffers):
            ptr = buf.ctypes.data + start * self.row_bytes
            binding.bind_input(past, "cpu", 0, self.dtype, shape, ptr)
            binding.bind_output(present, "cpu", 0, self.dtype, shape, ptr)  # the same memory: shared buffer

    def prefill(self, slot: int, ids: list[int]) -> np.ndarray:
        """Run a prompt into row `slot` (its old contents are overwritten); logits of its last token [V]."""
        return self.prefill_rows(slot, [ids])[0]

    def prefill_rows(self, start: int, prompts: list[list[int]]) -> np.ndarray:
        """Run prompts into rows start, start+1, ... as one right-padded batch (graphs/gqa.py: row b
        reads and writes its cache up to seqlens_k[b]); logits of each prompt's last token [n, V]."""
        n, S = len(prompts), max(len(p) for p in prompts)
        lens = np.asarray([len(p) for p in prompts], np.int32)
        if lens.min() < 1 or S > self.max_len or start + n > self.batch:
            raise ValueError(f"prompts of {lens.min()}..{S} tokens into rows {start}..{start + n - 1} do not fit "
                             f"{self.batch} rows of {self.max_len}")
        ids = np.zeros((n, S), np.int64)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        b = self.sess.io_binding()
        b.bind_output(I.LOGITS, "cpu")  # first: get_outputs() lists the outputs in binding order
        self._bind_rows(b, start, n)
        b.bind_cpu_input(I.INPUT_IDS, ids)
        b.bind_cpu_input(I.SEQLENS_K, lens - 1)
        b.bind_cpu_input(I.TOTAL_SEQUENCE_LENGTH, np.asarray(S, np.int32))
        keep = S - int(lens.min()) + 1  # every row's last token lies in the last `keep` positions
        if self.has_keep:
            # bind_cpu_input finds required inputs only; logits_to_keep is an overridable initializer
            self._keep[0] = keep
            b.bind_ortvalue_input(I.LOGITS_TO_KEEP, self._keep_value)
        self.sess.run_with_iobinding(b)
        out = b.get_outputs()[0].numpy()  # [n, keep or S, V]
        first = S - out.shape[1]  # the position of out[:, 0]
        self.lengths[start : start + n] = lens
        return out[np.arange(n), lens - 1 - first].copy()

    def extend(self, slot: int, ids: list[int]) -> np.ndarray:
        """The next chunk of a prompt whose start is already in row `slot` (GQA's chunked prompt,
        batch 1: seqlens_k = [P + C - 1], total_sequence_length = P + C); logits of its last token [V]."""
        P, C = int(self.lengths[slot]), len(ids)
        if P == 0:
            return self.prefill(slot, ids)
        if C < 1 or P + C > self.max_len:
            raise ValueError(f"a chunk of {C} tokens after {P} does not fit a cache of {self.max_len}")
        b = self.sess.io_binding()
        b.bind_output(I.LOGITS, "cpu")  # first: get_outputs() lists the outputs in binding order
        self._bind_rows(b, slot, 1)
        b.bind_cpu_input(I.INPUT_IDS, np.asarray([ids], np.int64))
        b.bind_cpu_input(I.SEQLENS_K, np.asarray([P + C - 1], np.int32))
        b.bind_cpu_input(I.TOTAL_SEQUENCE_LENGTH, np.asarray(P + C, np.int32))
        if self.has_keep:
            self._keep[0] = 1
            b.bind_ortvalue_input(I.LOGITS_TO_KEEP, self._keep_value)
        self.sess.run_with_iobinding(b)
        self.lengths[slot] = P + C
        return b.get_outputs()[0].numpy()[0, -1].copy()

    def extend_all(self, slot: int, ids: list[int]) -> np.ndarray:
        """The next chunk of row `slot`'s prompt (its start when the row is empty), as `extend`, but
        returning the logits of every position of the chunk [C, V] (logits_to_keep = 0): what prompt
        log-probabilities need. The caller bounds C, since the output is C x V float32."""
        P, C = int(self.lengths[slot]), len(ids)
        if C < 1 or P + C > self.max_len:
            raise ValueError(f"a chunk of {C} tokens after {P} does not fit a cache of {self.max_len}")
        b = self.sess.io_binding()
        b.bind_output(I.LOGITS, "cpu")
        self._bind_rows(b, slot, 1)
        b.bind_cpu_input(I.INPUT_IDS, np.asarray([ids], np.int64))
        b.bind_cpu_input(I.SEQLENS_K, np.asarray([P + C - 1], np.int32))  # P = 0: GQA's first-prompt case
        b.bind_cpu_input(I.TOTAL_SEQUENCE_LENGTH, np.asarray(P + C, np.int32))
        if self.has_keep:
            self._keep[0] = 0  # every position
            b.bind_ortvalue_input(I.LOGITS_TO_KEEP, self._keep_value)
        self.sess.run_with_iobinding(b)
        self.lengths[slot] = P + C
        return b.get_outputs()[0].numpy()[0]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One decode step of rows 0..k-1 (k = len(tokens)): each row's token goes to position
        lengths[row]; returns logits [k, V], a view that the next step overwrites."""
        k = len(tokens)
        if not 1 <= k <= self.batch:
            raise ValueError(f"{k} rows for a cache of {self.batch}")
        if int(self.lengths[:k].max()) >= self.max_len:
            raise ValueError("a row's cache is full; the scheduler must finish it first")
        b = self._decode
        if self._decode_rows != k:
            self._bind_rows(b, 0, k)
            b.bind_output(I.LOGITS, "cpu", 0, np.float32, [k, 1, self.vocab_size], self.logits.ctypes.data)
            self._decode_rows = k
        b.bind_cpu_input(I.INPUT_IDS, np.asarray(tokens, np.int64).reshape(k, 1))
        b.bind_cpu_input(I.SEQLENS_K, self.lengths[:k].copy())
        b.bind_cpu_input(I.TOTAL_SEQUENCE_LENGTH, np.asarray(int(self.lengths[:k].max()) + 1, np.int32))
        self.sess.run_with_iobinding(b)
        self.lengths[:k] += 1
        return self.logits[:k, 0]

    def warm_up(self, prompt_len: int = 32) -> None:
        """Run every decode batch size once (and a prefill of every row): ONNX Runtime plans memory
        and grows its arena the first time it meets a shape, which made the first requests of a
        fresh server up to twice as slow (serve_bench on the full-size model). Leaves every row empty."""
        n = min(prompt_len, self.max_len - 1)
        self.prefill_rows(0, [[0] * n] * self.batch)
        for k in range(1, self.batch + 1):
            self.step(np.zeros(k, np.int64))
        self.lengths[:] = 0

    def move(self, src: int, dst: int) -> None:
        """Copy row src's cache (its filled positions) to row dst, so active rows stay 0..k-1."""
        n = int(self.lengths[src])
        for buf in self.buffers:
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
