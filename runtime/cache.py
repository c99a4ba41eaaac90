"""The KV cache: one interface, two strategies, one per graph of the artifact.

Every generation (and every scoring window) makes a `DecodeCache` from the graph that serves it,
`graph.new_cache(batch, max_len)`, and drives it with two calls:

    logits = cache.prefill(ids, lengths)   # ids [B, S] right-padded: row b's lengths[b] tokens first
    logits = cache.step(tokens)            # tokens [B]: one new token per row, appended to its cache

both returning next-token logits [B, V]. The strategies:

- `PastPresentCache` on `model.onnx` (SPEC 3): the graph takes the cache as past_key_values.* and
  returns present.* = past + new token; each step binds the presents as the next pasts (IO binding,
  so the cache never round-trips through numpy), but the graph copies the whole cache every step.
  The graph takes an attention_mask, and a batch is left-padded inside this class.
- `SharedBufferCache` on `model.kv.onnx`: one preallocated buffer per layer that past and present
  share (com.microsoft.GroupQueryAttention); a step writes one position and nothing else moves.

Each graph class checks its own session against the interface and config.json (`Dims`) when it
is made, and owns the cache dtype it found there (`past_dtype`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from . import interface as I
from .errors import RuntimeArtifactError

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class Dims:
    """The sizes config.json states; each graph is checked against them at load."""

    num_layers: int
    num_heads: int
    head_size: int
    vocab_size: int
    context_length: int


class DecodeCache(Protocol):
    """One generation's cache: the batch size and the longest length are fixed when it is made."""

    def prefill(self, ids: np.ndarray, lengths: Sequence[int] | None = None,
                all_positions: bool = False) -> np.ndarray:
        """ids [B, S] right-padded (row b's `lengths[b]` tokens first; None = all S), on an empty
        cache. Returns each row's next-token logits [B, V], or with all_positions the logits of
        every position [B, S, V] (row b's valid ones first, as in ids)."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [B]: append one token per row; that token's logits [B, V]. The array may be a
        view that the next step overwrites."""


class Graph:
    """One opened graph of the artifact, its interface checked against config.json.

    Subclasses name the file and their int inputs, and make their own DecodeCache."""

    file: str = ""
    int_inputs: tuple[tuple[str, str], ...] = ()

    def __init__(self, session: Any, ort: Any, device: str, folder: Path, dims: Dims):
        self.session = session
        self.ort = ort
        self.device = device  # "cpu" or "cuda": where the cache and the outputs live
        self.dims = dims
        self.path = folder / self.file
        self.past_dtype, self.has_logits_to_keep = self._check_interface()

    def input_names(self) -> list[str]:
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int) -> DecodeCache:
        raise NotImplementedError

    def _fail(self, what: str) -> RuntimeArtifactError:
        return RuntimeArtifactError(f"{self.path}: {what}; re-export the folder with `python -m export build`")

    def _check_interface(self) -> tuple[np.dtype, bool]:
        """(cache dtype, takes logits_to_keep). Names, int dtypes, the cache's float type, and
        config.json's layers / heads / head size / vocabulary against the graph's shapes."""
        d = self.dims
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        out_names = I.output_names(d.num_layers)
        missing = [n for n in self.input_names() if n not in ins] + [n for n in out_names if n not in outs]
        if missing:
            raise self._fail(f"lacks {missing[:4]} of the artifact interface (config.json: "
                             f"num_hidden_layers = {d.num_layers})")
        pasts = [n for n in ins if n.startswith("past_key_values.")]
        if len(pasts) != 2 * d.num_layers:
            raise self._fail(f"has {len(pasts) // 2} layers of cache inputs but config.json says "
                             f"num_hidden_layers = {d.num_layers}; config and model disagree")
        for name, want in self.int_inputs:
            if ins[name].type != want:
                raise self._fail(f"input {name} is {ins[name].type}, not {want[7:-1]}")
        first = I.past_names(d.num_layers)[0]
        ptype = ins[first].type
        if ptype not in _ORT_DTYPES:
            raise self._fail(f"graph input {first} has type {ptype}; the runtime reads float or float16 caches")
        shape = ins[first].shape  # [batch, heads, past, head_size]
        for axis, key, want in ((1, "num_attention_heads", d.num_heads),
                                (3, "hidden_size / num_attention_heads", d.head_size)):
            if isinstance(shape[axis], int) and shape[axis] != want:
                raise self._fail(f"the cache has {shape[axis]} at axis {axis} but config.json's {key} = {want}; "
                                 "config and model disagree")
        lshape = outs[I.LOGITS].shape  # [batch, seq, vocab]
        if len(lshape) == 3 and isinstance(lshape[2], int) and lshape[2] != d.vocab_size:
            raise self._fail(f"logits have {lshape[2]} entries but config.json's vocab_size = {d.vocab_size}; "
                             "config and model disagree")
        keeps = I.LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}
        return np.dtype(_ORT_DTYPES[ptype]), keeps


class SpecGraph(Graph):
    """model.onnx, the SPEC 3 interface: also what `Model.forward` runs."""

    file = I.MODEL_FILE
    int_inputs = ((I.INPUT_IDS, "tensor(int64)"), (I.ATTENTION_MASK, "tensor(int64)"), (I.POSITION_IDS, "tensor(int64)"))

    def input_names(self) -> list[str]:
        return I.input_names(self.dims.num_layers)

    def empty_past(self, batch: int) -> list[Any]:
        d = self.dims
        z = np.zeros((batch, d.num_heads, 0, d.head_size), dtype=self.past_dtype)
        return [self.ort.OrtValue.ortvalue_from_numpy(z, self.device, 0) for _ in range(2 * d.num_layers)]

    def run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any] | None,
            keep: int = 0) -> tuple[np.ndarray, list[Any]]:
        """One Run through IO binding: (logits [B, S or keep, V] in numpy, presents as OrtValues,
        on the device for CUDA). keep > 0: logits of the last `keep` positions only (when the
        graph can), so a prompt does not pay the V x d head at every position."""
        b = self.session.io_binding()
        b.bind_cpu_input(I.INPUT_IDS, ids)
        b.bind_cpu_input(I.ATTENTION_MASK, mask)
        b.bind_cpu_input(I.POSITION_IDS, pos)
        if keep and self.has_logits_to_keep:
            # bind_cpu_input looks the name up among the required inputs only; an OrtValue binds
            # an overridable initializer too
            b.bind_ortvalue_input(I.LOGITS_TO_KEEP, self.ort.OrtValue.ortvalue_from_numpy(np.array([keep], np.int64)))
        L = self.dims.num_layers
        for name, value in zip(I.past_names(L), past if past is not None else self.empty_past(ids.shape[0])):
            b.bind_ortvalue_input(name, value)
        b.bind_output(I.LOGITS, "cpu")
        for name in I.present_names(L):
            b.bind_output(name, self.device)
        self.session.run_with_iobinding(b)
        out = b.get_outputs()
        return out[0].numpy(), out[1:]

    def new_cache(self, batch: int, max_len: int) -> "PastPresentCache":
        return PastPresentCache(self, batch, max_len)


class PastPresentCache:
    """DecodeCache on model.onnx: presents bound back as pasts, a batch left-padded.

    The graph attends through attention_mask, so the padding goes on the left (every row's next
    token lands in the same column); the caller's right-padded rows are moved there in prefill."""

    def __init__(self, graph: SpecGraph, batch: int, max_len: int):
        self.graph = graph
        self.mask = np.zeros((batch, max_len), np.int64)  # [B, max_len]: 1 where a row has a token
        self.past: list[Any] | None = None
        self.next_pos = np.zeros((batch, 1), np.int64)  # [B, 1]: position of each row's next token
        self.filled = 0  # columns of mask in use

    def prefill(self, ids: np.ndarray, lengths: Sequence[int] | None = None, all_positions: bool = False) -> np.ndarray:
        B, S = ids.shape
        lens = np.full(B, S, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        left = np.empty_like(ids)  # [B, S]: row b's tokens last, its padding first
        for b, n in enumerate(lens):
            left[b, S - n:], left[b, : S - n] = ids[b, :n], ids[b, n:]
            self.mask[b, S - n:S] = 1
        mask = np.ascontiguousarray(self.mask[:, :S])
        pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)  # [B, S]: padding at position 0, masked out
        logits, self.past = self.graph.run(left, mask, pos, None, keep=0 if all_positions else 1)
        self.next_pos[:, 0] = lens
        self.filled = S
        if not all_positions:
            return logits[:, -1]  # [B, V]
        out = np.empty_like(logits)  # [B, S, V], back to right-padded
        for b, n in enumerate(lens):
            out[b, :n] = logits[b, S - n:]
            out[b, n:] = logits[b, :S - n]
        return out

    def step(self, tokens: np.ndarray) -> np.ndarray:
        B = tokens.shape[0]
        self.mask[:, self.filled] = 1
        self.filled += 1
        mask = np.ascontiguousarray(self.mask[:, : self.filled])  # [B, past + 1]
        logits, self.past = self.graph.run(np.asarray(tokens, np.int64).reshape(B, 1), mask, self.next_pos, self.past)
        self.next_pos = self.next_pos + 1
        return logits[:, -1]  # [B, V]


class SharedKVGraph(Graph):
    """model.kv.onnx: the same weights, each layer's cache one buffer that past and present share.
    Its cache has model.onnx's type: float16 in fp16 artifacts (SharedBufferCache allocates the
    buffers in `past_dtype`, on the session's device), float32 otherwise."""

    file = I.KV_MODEL_FILE
    int_inputs = ((I.INPUT_IDS, "tensor(int64)"), (I.SEQLENS_K, "tensor(int32)"), (I.TOTAL_SEQUENCE_LENGTH, "tensor(int32)"))

    def input_names(self) -> list[str]:
        return I.kv_input_names(self.dims.num_layers)

    def new_cache(self, batch: int, max_len: int) -> "SharedBufferCache":
        return SharedBufferCache(self, batch, max_len)


class SharedBufferCache:
    """DecodeCache on model.kv.onnx: the cache buffers, the inputs and the logits are bound once;
    a decode step writes the tokens and the lengths into the bound arrays and runs.

    Why so bare: on small models the binding calls themselves were most of the loop's overhead
    (benchmarks/RESULTS.md); here a step makes no binding call at all. A batch is right-padded
    (GroupQueryAttention reads row b's cache up to seqlens_k[b] and writes its next token there,
    so a short row's padding is overwritten as it grows), and rows decode in lock step.
    """

    def __init__(self, graph: SharedKVGraph, batch: int, max_len: int):
        ort, d = graph.ort, graph.dims
        self.sess = graph.session
        self.has_keep = graph.has_logits_to_keep
        self.b = b = self.sess.io_binding()
        self.logits = np.empty((batch, 1, d.vocab_size), np.float32)  # [B, 1, V], bound: steps write here
        # logits first: get_outputs() lists outputs in binding order, and a re-bind keeps the slot
        b.bind_output(I.LOGITS, "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        shape = (batch, d.num_heads, max_len, d.head_size)  # [B, H, max_len, hs] per key / value
        n = 2 * d.num_layers
        if graph.device == "cpu":  # np.zeros maps zero pages lazily; the OrtValue uses this memory
            self._host = [np.zeros(shape, graph.past_dtype) for _ in range(n)]
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._host]
        else:
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, graph.past_dtype), graph.device, 0)
                            for _ in range(n)]
        for past, present, buf in zip(I.past_names(d.num_layers), I.present_names(d.num_layers), self.buffers):
            b.bind_ortvalue_input(past, buf)
            b.bind_ortvalue_output(present, buf)
        # CPU OrtValues over these arrays: writing the arrays changes the next Run's inputs
        self.tokens = np.zeros((batch, 1), np.int64)  # [B, 1]
        self.seqlens = np.zeros(batch, np.int32)  # [B]: tokens in row b's cache (minus 1 while a Run is set up)
        self.total = np.zeros((), np.int32)  # scalar: max(seqlens) + 1
        self.keep = np.ones(1, np.int64)
        self._inputs = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in
                        ((I.INPUT_IDS, self.tokens), (I.SEQLENS_K, self.seqlens), (I.TOTAL_SEQUENCE_LENGTH, self.total))}
        b.bind_ortvalue_input(I.SEQLENS_K, self._inputs[I.SEQLENS_K])
        b.bind_ortvalue_input(I.TOTAL_SEQUENCE_LENGTH, self._inputs[I.TOTAL_SEQUENCE_LENGTH])
        self._keep_value = ort.OrtValue.ortvalue_from_numpy(self.keep)
        self.ort, self.max_len, self.vocab_size = ort, max_len, d.vocab_size
        self._past_names, self._present_names = I.past_names(d.num_layers), I.present_names(d.num_layers)
        self._verify: dict[int, tuple[Any, ...]] = {}  # S -> (binding, ids, logits, ids OrtValue)

    def prefill(self, ids: np.ndarray, lengths: Sequence[int] | None = None, all_positions: bool = False) -> np.ndarray:
        B, S = ids.shape
        lens = np.full(B, S, np.int32) if lengths is None else np.asarray(lengths, np.int32)
        b = self.b
        b.bind_cpu_input(I.INPUT_IDS, ids)
        self.seqlens[:], self.total[()] = lens - 1, S
        # every row's last token lies in the last S - min(lens) + 1 positions: the head runs on those
        # only (on the last one alone when all rows are full); 0 = every position
        keep = 0 if all_positions or not self.has_keep else S - int(lens.min()) + 1
        whole = keep != 1
        if self.has_keep:
            self.keep[0] = keep
            b.bind_ortvalue_input(I.LOGITS_TO_KEEP, self._keep_value)
        if whole:
            b.bind_output(I.LOGITS, "cpu")
        self.sess.run_with_iobinding(b)
        self.seqlens[:] = lens  # tokens in each row's cache = where its next token goes
        b.bind_ortvalue_input(I.INPUT_IDS, self._inputs[I.INPUT_IDS])  # decode from here on
        if not whole:
            return self.logits[:, 0]
        out = b.get_outputs()[0].numpy()  # [B, S - first, V]
        if all_positions:
            return out
        first = S - out.shape[1]  # the position of out[:, 0]
        self.logits[:, 0] = out[np.arange(B), lens - 1 - first]  # decode steps write into the bound buffer again
        b.bind_output(I.LOGITS, "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        return self.logits[:, 0]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.tokens[:, 0] = tokens
        self.total[()] = int(self.seqlens.max()) + 1
        self.sess.run_with_iobinding(self.b)
        self.seqlens += 1
        return self.logits[:, 0]

    # -- speculative decoding (runtime/speculative.py): batch 1 only ---------------------------------
    def verify(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [S]: append S tokens to row 0's cache in one Run; the logits of every one [S, V]
        (a view that the next verify of the same S overwrites). GroupQueryAttention takes S > 1 new
        tokens after a past for batch 1 (graphs/gqa.py): it writes them at positions L..L+S-1 (L =
        the cache's length), rotates them by those positions and attends causally up to each."""
        S = tokens.shape[0]
        L = int(self.seqlens[0])
        if self.seqlens.shape[0] != 1 or L + S > self.max_len:
            raise ValueError(f"verify takes batch 1 within the cache ({L} + {S} > {self.max_len} or batch "
                             f"{self.seqlens.shape[0]})")
        b, ids, logits = self._verify_binding(S)
        ids[0] = tokens
        self.seqlens[0], self.total[()] = L + S - 1, L + S
        self.sess.run_with_iobinding(b)
        self.seqlens[0] = L + S
        return logits[0]

    def truncate(self, length: int) -> None:
        """Roll row 0's cache back to its first `length` tokens. Nothing is erased: a Run reads a
        row only up to seqlens_k (the tokens it holds after that Run), and writes its new tokens at
        the row's length first, so entries past the length are overwritten before they are read."""
        if not 0 < length <= int(self.seqlens[0]):
            raise ValueError(f"truncate to {length} tokens: the cache holds {int(self.seqlens[0])}")
        self.seqlens[0] = length

    def _verify_binding(self, S: int) -> tuple[Any, np.ndarray, np.ndarray]:
        """One binding per verify width S, made on first use (S <= the draft length + 1): input ids
        [1, S] and logits [1, S, V] bound once, like the step's, so a verify makes no binding call."""
        got = self._verify.get(S)
        if got is None:
            b = self.sess.io_binding()
            logits = np.empty((1, S, self.vocab_size), np.float32)
            b.bind_output(I.LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            for past, present, buf in zip(self._past_names, self._present_names, self.buffers):
                b.bind_ortvalue_input(past, buf)
                b.bind_ortvalue_output(present, buf)
            ids = np.zeros((1, S), np.int64)
            ids_value = self.ort.OrtValue.ortvalue_from_numpy(ids)
            b.bind_ortvalue_input(I.INPUT_IDS, ids_value)
            b.bind_ortvalue_input(I.SEQLENS_K, self._inputs[I.SEQLENS_K])
            b.bind_ortvalue_input(I.TOTAL_SEQUENCE_LENGTH, self._inputs[I.TOTAL_SEQUENCE_LENGTH])
            # logits_to_keep is not bound: its default, 0, keeps every position
            got = self._verify[S] = (b, ids, logits, ids_value)  # the arrays live as long as the binding
        return got[0], got[1], got[2]
