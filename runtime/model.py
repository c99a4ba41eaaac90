"""`load` an artifact folder and run it: forward, generate, stream, score.

Two graphs can serve an artifact. `model.onnx` (SPEC 3) takes the cache as `past_key_values.*`
and returns `present.*` = past + new: the runtime binds each step's presents as the next step's
pasts (IO binding), so the cache never round-trips through numpy, but the graph itself copies it
every step. `model.kv.onnx`, when the exporter wrote one, holds the same weights with a cache of
one preallocated buffer per layer that past and present share: a step writes one position and
nothing else moves. generate, stream and score run on it (a batch right-padded); `forward` (the
SPEC 3 interface) runs on `model.onnx`, whose session opens on first use.
Every check on the caller's input runs before the first Run.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
from tokenizers import Tokenizer, decoders

from . import interface as I
from .artifact import ArtifactInfo, read_artifact
from .detok import IncrementalDetokenizer
from .errors import (
    ContextLengthError,
    InputError,
    MissingDependencyError,
    ProviderError,
    RuntimeArtifactError,
)
from .sampling import SamplingConfig, choose

Prompt = Union[str, Sequence[int]]

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}

_warned_fallback = False
_warn_lock = threading.Lock()


def _import_ort() -> Any:
    """onnxruntime is an extra (cpu or gpu wheel); say which one to install when it is missing."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            "onnxruntime is not installed: pip install 'tablefree-onnx[cpu]' (CPU) or "
            "'tablefree-onnx[gpu]' (onnxruntime-gpu, for CUDA); never both"
        ) from None
    return onnxruntime


def _warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    with _warn_lock:
        if _warned_fallback:
            return
        _warned_fallback = True
    warnings.warn(f"provider='auto': {reason}; running on the CPU", RuntimeWarning, stacklevel=4)


@dataclass
class GenerationResult:
    """One prompt's continuation. `ids` holds the new tokens (a final end token included when one
    stopped it); `text` is their text without the end token and without a matched stop string."""

    text: str
    ids: list[int]
    prompt_ids: list[int]
    finish_reason: str  # "length", "eos" (an end token id) or "stop" (a stop string)

    def __str__(self) -> str:
        return self.text


@dataclass
class ScoreResult:
    """log p(token_i | tokens before it) for every token but the first of each context window."""

    ids: list[int]
    token_logprobs: np.ndarray
    scored_ids: list[int] = field(repr=False, default_factory=list)

    @property
    def nll(self) -> float:
        return float(-np.mean(self.token_logprobs))

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))


@dataclass
class ForwardOutput:
    logits: np.ndarray  # [B, S, V]
    past_key_values: list[Any]  # OrtValues, feed back as past_key_values (layer-major, key then value)


@dataclass
class _Row:
    """Per-prompt state of a generation (text is only tracked when stop strings or streaming need it)."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    text: str = ""
    finish: str | None = None


class _SharedCache:
    """One generation on KV_MODEL_FILE: the cache buffers, the inputs and the logits are bound
    once; a decode step writes the tokens and the lengths into the bound arrays and runs.

    Why so bare: on small models the binding calls themselves were most of the loop's overhead
    (benchmarks/RESULTS.md); here a step makes no binding call at all. A batch is right-padded
    (GroupQueryAttention reads row b's cache up to seqlens_k[b] and writes its next token there,
    so a short row's padding is overwritten as it grows), and rows decode in lock step.
    """

    def __init__(self, m: "Model", batch: int, max_len: int):
        ort, self.sess = m._ort, m.kv_session
        self.b = b = self.sess.io_binding()
        self.logits = np.empty((batch, 1, m.vocab_size), np.float32)
        # logits first: get_outputs() lists outputs in binding order, and a re-bind keeps the slot
        b.bind_output(I.LOGITS, "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        shape = (batch, m.num_heads, max_len, m.head_size)
        if m._device == "cpu":  # np.zeros maps zero pages lazily; the OrtValue uses this memory
            self._host = [np.zeros(shape, m.kv_past_dtype) for _ in m._past_names]
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._host]
        else:
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, m.kv_past_dtype), m._device, 0)
                            for _ in m._past_names]
        for past, present, buf in zip(m._past_names, m._present_names, self.buffers):
            b.bind_ortvalue_input(past, buf)
            b.bind_ortvalue_output(present, buf)
        # CPU OrtValues over these arrays: writing the arrays changes the next Run's inputs
        self.tokens = np.zeros((batch, 1), np.int64)
        self.seqlens = np.zeros(batch, np.int32)
        self.total = np.zeros((), np.int32)
        self.keep = np.ones(1, np.int64)
        self._inputs = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in
                        ((I.INPUT_IDS, self.tokens), (I.SEQLENS_K, self.seqlens), (I.TOTAL_SEQUENCE_LENGTH, self.total))}
        b.bind_ortvalue_input(I.SEQLENS_K, self._inputs[I.SEQLENS_K])
        b.bind_ortvalue_input(I.TOTAL_SEQUENCE_LENGTH, self._inputs[I.TOTAL_SEQUENCE_LENGTH])
        self._keep_value = ort.OrtValue.ortvalue_from_numpy(self.keep)
        self.has_keep = m._kv_has_keep

    def prefill(self, ids: np.ndarray, lengths: Sequence[int] | None = None, all_positions: bool = False) -> np.ndarray:
        """Run right-padded prompts [B, S] (row b's tokens first, `lengths[b]` of them) on an empty
        cache; logits of each row's last token ([B, V]), or with all_positions of every position
        ([B, S, V])."""
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
        out = b.get_outputs()[0].numpy()
        if all_positions:
            return out
        first = S - out.shape[1]  # the position of out[:, 0]
        self.logits[:, 0] = out[np.arange(B), lens - 1 - first]  # decode steps write into the bound buffer again
        b.bind_output(I.LOGITS, "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        return self.logits[:, 0]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One decode step for every row: logits [B, V] (a view that the next step overwrites)."""
        self.tokens[:, 0] = tokens
        self.total[()] = int(self.seqlens.max()) + 1
        self.sess.run_with_iobinding(self.b)
        self.seqlens += 1
        return self.logits[:, 0]


class Model:
    """A loaded artifact. Thread-safe: each call binds its own inputs; the sessions are shared."""

    def __init__(self, session: Any, info: ArtifactInfo, tokenizer: Tokenizer | None, ort: Any, device: str,
                 kv_session: Any = None, open_spec: Any = None):
        self._session = session  # SPEC 3 graph; None until first use when a KV graph serves
        self._open_spec = open_spec
        self._spec_lock = threading.Lock()
        self.kv_session = kv_session
        self.info = info
        self.tokenizer = tokenizer
        self._ort = ort
        self._device = device  # "cpu" or "cuda": where inputs, outputs and the cache live
        self.provider: str = (kv_session or session).get_providers()[0]
        cfg = info.config
        self.vocab_size = info.vocab_size
        self.num_layers = info.num_layers
        self.num_heads = int(cfg["num_attention_heads"])
        self.head_size = int(cfg["hidden_size"]) // self.num_heads
        self.context_length = info.context_length
        eos = info.token_id("eos_token_id")
        self.eos_token_ids: list[int] = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        pad = info.token_id("pad_token_id")
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self._in_names = I.input_names(self.num_layers)
        self._out_names = I.output_names(self.num_layers)
        self._past_names = I.past_names(self.num_layers)
        self._present_names = I.present_names(self.num_layers)
        self._has_keep = self._kv_has_keep = False
        if session is not None:
            self._check_interface(session, spec=True)
        if kv_session is not None:
            self._check_interface(kv_session, spec=False)

    @property
    def session(self) -> Any:
        """The SPEC 3 graph's session (model.onnx). When a KV graph serves generation, this one
        opens on the first `forward` call: until then its weights are not in memory."""
        if self._session is None:
            with self._spec_lock:
                if self._session is None:
                    sess = self._open_spec()
                    self._check_interface(sess, spec=True)
                    self._session = sess
        return self._session

    @staticmethod
    def _keeps(session: Any) -> bool:
        # artifacts exported since the head slicing pass take logits_to_keep (an input with a
        # default); older ones do not, and then every position's logits are computed
        return I.LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}

    # -- graph interface -----------------------------------------------------------------------
    def _check_interface(self, session: Any, spec: bool) -> None:
        file = I.MODEL_FILE if spec else I.KV_MODEL_FILE
        ins = {i.name: i for i in session.get_inputs()}
        outs = {o.name for o in session.get_outputs()}
        names = self._in_names if spec else I.kv_input_names(self.num_layers)
        missing = [n for n in names if n not in ins] + [n for n in self._out_names if n not in outs]
        if missing:
            raise RuntimeArtifactError(
                f"{self.info.folder / file} lacks {missing[:4]} of the artifact interface; "
                "re-export it with `python -m export build`"
            )
        ints = ((I.INPUT_IDS, "tensor(int64)"), (I.ATTENTION_MASK, "tensor(int64)"), (I.POSITION_IDS, "tensor(int64)")) \
            if spec else ((I.INPUT_IDS, "tensor(int64)"), (I.SEQLENS_K, "tensor(int32)"), (I.TOTAL_SEQUENCE_LENGTH, "tensor(int32)"))
        for name, want in ints:
            if ins[name].type != want:
                raise RuntimeArtifactError(f"{file} input {name} is {ins[name].type}, not {want[7:-1]}; re-export the folder")
        if spec:
            self._has_keep = self._keeps(session)
        else:
            self._kv_has_keep = self._keeps(session)
        ptype = ins[self._past_names[0]].type
        if _ORT_DTYPES.get(ptype) is None:
            raise RuntimeArtifactError(f"graph input {self._past_names[0]} has type {ptype}; the runtime reads float or float16 caches")
        if spec:
            self.past_dtype = np.dtype(_ORT_DTYPES[ptype])
        else:  # the shared-cache graph may keep its cache in float16 (int8/int4 artifacts)
            self.kv_past_dtype = np.dtype(_ORT_DTYPES[ptype])
        shape = ins[self._past_names[0]].shape
        for axis, want in ((1, self.num_heads), (3, self.head_size)):
            if isinstance(shape[axis], int) and shape[axis] != want:
                raise RuntimeArtifactError(
                    f"graph cache has {shape[axis]} at axis {axis} but config.json implies {want}; config and model disagree, re-export"
                )

    def _empty_past(self, batch: int) -> list[Any]:
        z = np.zeros((batch, self.num_heads, 0, self.head_size), dtype=self.past_dtype)
        return [self._ort.OrtValue.ortvalue_from_numpy(z, self._device, 0) for _ in self._past_names]

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any] | None,
             keep: int = 0) -> tuple[np.ndarray, list[Any]]:
        """One Run through IO binding; presents stay OrtValues (on the device for CUDA).

        keep > 0: logits of the last `keep` positions only (when the graph can), so a prompt
        does not pay the V x d head at every position."""
        b = self.session.io_binding()
        b.bind_cpu_input(I.INPUT_IDS, ids)
        b.bind_cpu_input(I.ATTENTION_MASK, mask)
        b.bind_cpu_input(I.POSITION_IDS, pos)
        if keep and self._has_keep:
            # bind_cpu_input looks the name up among the required inputs only; an OrtValue binds
            # an overridable initializer too
            b.bind_ortvalue_input(I.LOGITS_TO_KEEP, self._ort.OrtValue.ortvalue_from_numpy(np.array([keep], np.int64)))
        for name, value in zip(self._past_names, past if past is not None else self._empty_past(ids.shape[0])):
            b.bind_ortvalue_input(name, value)
        b.bind_output(I.LOGITS, "cpu")
        for name in self._out_names[1:]:
            b.bind_output(name, self._device)
        self.session.run_with_iobinding(b)
        out = b.get_outputs()
        return out[0].numpy(), out[1:]

    # -- tokens --------------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeArtifactError(
                f"no tokenizer.json in {self.info.folder}: pass token ids instead of text, or re-export with the tokenizer"
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode([int(i) for i in ids], skip_special_tokens=False)

    def _check_ids(self, ids: Sequence[int], what: str = "prompt") -> list[int]:
        arr = np.asarray(ids)
        if arr.size == 0:
            raise InputError(f"empty {what}: give at least one token (text that encodes to no tokens counts as empty)")
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise InputError(f"{what} must be text or a flat list of integer token ids, got {arr.dtype} of shape {arr.shape}")
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            raise InputError(
                f"token id {int(arr[bad[0]])} at position {int(bad[0])} of the {what} is outside [0, {self.vocab_size}); "
                "use ids of this model's tokenizer"
            )
        return [int(x) for x in arr]

    def _prompt_rows(self, prompt: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], bool]:
        """(token rows, is_batch). A str or a list of ints is one prompt; a list of those is a batch."""
        if isinstance(prompt, str):
            return [self._check_ids(self.encode(prompt))], False
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1:
            return [self._check_ids(prompt)], False
        items = list(prompt)
        if not items:
            raise InputError("empty prompt: give a string, a list of token ids, or a list of prompts")
        if all(isinstance(x, (int, np.integer)) for x in items):
            return [self._check_ids(items)], False
        rows = []
        for n, p in enumerate(items):
            what = f"prompt {n} of the batch"
            rows.append(self._check_ids(self.encode(p) if isinstance(p, str) else p, what))
        return rows, True

    # -- low level -----------------------------------------------------------------------------
    def forward(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Sequence[Any] | None = None, logits_to_keep: int = 0) -> ForwardOutput:
        """One checked Run. Arrays must be int64 (past: the graph's float type); the returned
        past_key_values are OrtValues that can be passed straight back. logits_to_keep = N > 0
        returns logits for the last N positions only ([B, min(N, seq), V]); 0 returns all."""
        if int(logits_to_keep) != logits_to_keep or logits_to_keep < 0:
            raise InputError(f"logits_to_keep = {logits_to_keep} must be an integer >= 0 (0 keeps every position)")
        _ = self.session  # forward is the SPEC 3 interface: model.onnx (opened here on first use)
        ids = self._as_int64(input_ids, I.INPUT_IDS)
        B, S = ids.shape
        if S == 0:
            raise InputError("input_ids has no tokens (seq = 0)")
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            raise InputError(f"input_ids holds {int(ids.flat[bad[0]])}, outside [0, {self.vocab_size})")
        past = list(past_key_values) if past_key_values is not None else None
        P = 0
        if past is not None:
            if len(past) != len(self._past_names):
                raise InputError(f"past_key_values has {len(past)} tensors; this model needs {len(self._past_names)} (key and value per layer)")
            past = [self._as_past(p, n, B) for p, n in zip(past, self._past_names)]
            P = past[0].shape()[2]
        if P + S > self.context_length:
            raise ContextLengthError(f"{P + S} positions exceed the model's context of {self.context_length}")
        mask = np.ones((B, P + S), np.int64) if attention_mask is None else self._as_int64(attention_mask, I.ATTENTION_MASK)
        if mask.shape != (B, P + S):
            raise InputError(f"attention_mask has shape {mask.shape}; expected [batch, past + seq] = {(B, P + S)}")
        if position_ids is None:
            pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -S:]
        else:
            pos = self._as_int64(position_ids, I.POSITION_IDS)
        if pos.shape != (B, S):
            raise InputError(f"position_ids has shape {pos.shape}; expected [batch, seq] = {(B, S)}")
        if pos.size and (pos.min() < 0 or pos.max() >= self.context_length):
            raise ContextLengthError(f"position_ids must lie in [0, {self.context_length}) (the model's context)")
        logits, presents = self._run(ids, np.ascontiguousarray(mask), np.ascontiguousarray(pos), past, int(logits_to_keep))
        if logits_to_keep and logits.shape[1] > logits_to_keep:  # an older artifact without the input
            logits = logits[:, -int(logits_to_keep):]
        return ForwardOutput(logits, presents)

    @staticmethod
    def _as_int64(x: Any, name: str) -> np.ndarray:
        if isinstance(x, np.ndarray):
            if x.dtype != np.int64:
                raise InputError(f"{name} has dtype {x.dtype}; the graph takes int64 (use np.asarray(x, dtype=np.int64))")
            arr = x
        else:
            try:
                arr = np.asarray(x, dtype=np.int64)
            except (ValueError, TypeError):
                raise InputError(f"{name}: rows of unequal length or non-integer values; pad the rows and pass an attention_mask") from None
        if arr.ndim != 2:
            raise InputError(f"{name} must be 2-D [batch, seq], got shape {arr.shape}")
        return np.ascontiguousarray(arr)

    def _as_past(self, p: Any, name: str, batch: int) -> Any:
        if isinstance(p, np.ndarray):
            if p.dtype != self.past_dtype:
                raise InputError(f"{name} has dtype {p.dtype}; this graph's cache is {self.past_dtype}")
            p = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(p), self._device, 0)
        shape = tuple(p.shape())
        if len(shape) != 4 or shape[0] != batch or shape[1] != self.num_heads or shape[3] != self.head_size:
            raise InputError(f"{name} has shape {shape}; expected [{batch}, {self.num_heads}, past, {self.head_size}]")
        return p

    # -- generation ----------------------------------------------------------------------------
    def _steps(self, rows: list[_Row], max_new_tokens: int, sampling: SamplingConfig, min_new_tokens: int,
               end_ids: list[int], seed: int | None, on_token) -> Iterator[None]:
        """The decode loop, as a generator that yields after each step's tokens (so stream can
        hand out text between Runs). `on_token(row_index, token)` handles text and stop strings
        and may set row.finish; the loop ends when every row has finished or at max_new_tokens."""
        B = len(rows)
        S = max(len(r.prompt_ids) for r in rows)
        ids = np.full((B, S), self.pad_token_id, np.int64)
        mask = np.zeros((B, S + max_new_tokens), np.int64)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, S - n :] = r.prompt_ids
            mask[i, S - n :] = 1  # left padding; the generated columns are set as they come
        shared = _SharedCache(self, B, S + max_new_tokens) if self.kv_session is not None else None
        if shared is not None:  # right padding: each row's tokens first (see _SharedCache)
            right = np.full((B, S), self.pad_token_id, np.int64)
            for i, r in enumerate(rows):
                right[i, : len(r.prompt_ids)] = r.prompt_ids
            last = shared.prefill(right, [len(r.prompt_ids) for r in rows])
        else:
            pos = np.clip(np.cumsum(mask[:, :S], -1) - 1, 0, None)
            next_pos = mask[:, :S].sum(-1, keepdims=True)
            logits, past = self._run(ids, np.ascontiguousarray(mask[:, :S]), pos, None, keep=1)
            last = logits[:, -1, :]
        rng = np.random.default_rng(seed) if not sampling.greedy else None
        history = [list(r.prompt_ids) for r in rows] if sampling.repetition_penalty != 1.0 else None
        end_set = set(end_ids)
        active = list(range(B))
        for step in range(max_new_tokens):
            banned = end_ids if step < min_new_tokens else ()
            tokens = choose(last, history, sampling, rng, banned)
            for i in active:
                t = int(tokens[i])
                rows[i].ids.append(t)
                if history is not None:
                    history[i].append(t)
                if t in end_set:
                    rows[i].finish = "eos"
                else:
                    on_token(i, t)
            active = [i for i in active if rows[i].finish is None]
            yield
            if not active or step == max_new_tokens - 1:
                break
            if len(active) < B:
                tokens[[i for i in range(B) if rows[i].finish is not None]] = self.pad_token_id
            if shared is not None:
                last = shared.step(tokens)
                continue
            mask[:, S + step] = 1
            step_mask = mask[:, : S + step + 1]
            if B > 1:
                step_mask = np.ascontiguousarray(step_mask)
            logits, past = self._run(tokens.reshape(B, 1), step_mask, next_pos, past)
            next_pos = next_pos + 1
            last = logits[:, -1, :]
        for r in rows:
            if r.finish is None:
                r.finish = "length"

    def _setup(self, prompt: Any, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
               repetition_penalty: float, min_new_tokens: int, stop: Any) -> tuple[list[_Row], bool, SamplingConfig, list[int], list[str]]:
        """Every check of a generate/stream call, before any Run."""
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise InputError(f"max_new_tokens = {max_new_tokens} must be an integer >= 1")
        if int(min_new_tokens) != min_new_tokens or not 0 <= min_new_tokens <= max_new_tokens:
            raise InputError(f"min_new_tokens = {min_new_tokens} must be an integer in [0, max_new_tokens]")
        sampling = SamplingConfig(bool(do_sample), float(temperature), int(top_k), float(top_p), float(repetition_penalty))
        sampling.validate()
        stops = [stop] if isinstance(stop, (str, int)) else list(stop or [])
        stop_strs = [s for s in stops if isinstance(s, str)]
        stop_ids = [s for s in stops if not isinstance(s, str)]
        if any(s == "" for s in stop_strs):
            raise InputError("an empty stop string would stop at once; remove it")
        if stop_strs:
            self._need_tokenizer()
        end_ids = list(dict.fromkeys(self.eos_token_ids + self._check_ids(stop_ids, "stop ids"))) if stop_ids else list(self.eos_token_ids)
        token_rows, is_batch = self._prompt_rows(prompt)
        longest = max(len(r) for r in token_rows)
        if longest > self.context_length:
            raise ContextLengthError(
                f"prompt has {longest} tokens but the model's context is {self.context_length}; shorten the prompt"
            )
        if longest + max_new_tokens > self.context_length:
            raise ContextLengthError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                f"{self.context_length}; lower max_new_tokens to {self.context_length - longest} or shorten the prompt"
            )
        return [_Row(prompt_ids=r) for r in token_rows], is_batch, sampling, end_ids, stop_strs

    def _text_tracker(self, rows: list[_Row], stop_strs: list[str], pieces: list[str] | None = None):
        """on_token callback: incremental text per row, stop strings (which may span tokens)."""
        for r in rows:
            r.detok = IncrementalDetokenizer(self._need_tokenizer())
        longest_stop = max((len(s) for s in stop_strs), default=0)

        def on_token(i: int, t: int) -> None:
            r = rows[i]
            piece = r.detok.add(t)
            if not piece:
                return
            start = max(0, len(r.text) - longest_stop + 1)
            r.text += piece
            if stop_strs:
                hits = [k for k in (r.text.find(s, start) for s in stop_strs) if k >= 0]
                if hits:
                    r.text = r.text[: min(hits)]
                    r.finish = "stop"

        return on_token

    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 min_new_tokens: int = 0, stop: str | int | Sequence[str | int] | None = None,
                 seed: int | None = None) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt (text or ids), or a list of prompts as one left-padded batch.

        Greedy unless do_sample. `stop` takes strings (matched in the text, even across tokens;
        the text ends before the match) and token ids (stop like EOS). Returns a GenerationResult,
        or a list of them for a batch.
        """
        rows, is_batch, sampling, end_ids, stop_strs = self._setup(
            prompt, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, min_new_tokens, stop)
        on_token = self._text_tracker(rows, stop_strs) if stop_strs else (lambda i, t: None)
        for _ in self._steps(rows, max_new_tokens, sampling, min_new_tokens, end_ids, seed, on_token):
            pass
        results = []
        for r in rows:
            if stop_strs:
                text = r.text if r.finish == "stop" else r.text + r.detok.flush()
            elif self.tokenizer is not None:
                text = self.decode(r.ids[:-1] if r.finish == "eos" else r.ids)
            else:
                text = ""
            results.append(GenerationResult(text=text, ids=r.ids, prompt_ids=r.prompt_ids, finish_reason=r.finish))
        return results if is_batch else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
               stop: str | int | Sequence[str | int] | None = None, seed: int | None = None) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece; "".join(...) == generate(...).text.

        Text that could be the start of a stop string is held back until it is known not to be.
        """
        rows, is_batch, sampling, end_ids, stop_strs = self._setup(
            prompt, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, min_new_tokens, stop)
        if is_batch:
            raise InputError("stream takes one prompt; use generate for a batch")
        self._need_tokenizer()
        row = rows[0]
        track = self._text_tracker(rows, stop_strs)
        pending: list[str] = []
        emitted = 0

        def safe_end(text: str) -> int:
            hold = 0
            for s in stop_strs:
                for k in range(min(len(s) - 1, len(text)), hold, -1):
                    if text.endswith(s[:k]):
                        hold = k
                        break
            return len(text) - hold

        def on_token(i: int, t: int) -> None:
            nonlocal emitted
            track(i, t)
            end = len(row.text) if row.finish == "stop" else safe_end(row.text)
            if end > emitted:
                pending.append(row.text[emitted:end])
                emitted = end

        for _ in self._steps(rows, max_new_tokens, sampling, min_new_tokens, end_ids, seed, on_token):
            if pending:
                yield "".join(pending)
                pending.clear()
        if row.finish != "stop":
            row.text += row.detok.flush()
        if len(row.text) > emitted:
            yield row.text[emitted:]

    # -- scoring -------------------------------------------------------------------------------
    def score(self, text: str | Sequence[int]) -> ScoreResult:
        """Token log-probabilities and perplexity of a text, as the tokenizer splits it.

        The first token has no context and is not scored. Text longer than the context is cut
        into windows of context length that overlap by one token, so every other token is
        scored exactly once (with the context of its own window).
        """
        ids = self._check_ids(self.encode(text) if isinstance(text, str) else text, "text")
        if len(ids) < 2:
            raise InputError("text to score has fewer than 2 tokens; nothing to predict")
        C = self.context_length
        logps: list[np.ndarray] = []
        start = 0
        while start < len(ids) - 1:
            window = np.asarray(ids[start : start + C], np.int64)[None]
            if self.kv_session is not None:
                lg = _SharedCache(self, 1, window.shape[1]).prefill(window, all_positions=True)[0, :-1].astype(np.float64)
            else:
                logits, _ = self._run(window, np.ones_like(window), np.arange(window.shape[1], dtype=np.int64)[None], None)
                lg = logits[0, :-1].astype(np.float64)
            lg = lg - lg.max(-1, keepdims=True)
            logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
            logps.append(np.take_along_axis(logp, window[0, 1:, None], -1)[:, 0])
            start += C - 1
        return ScoreResult(ids=ids, token_logprobs=np.concatenate(logps), scored_ids=ids[1:])


def _session_options(ort: Any, threads: int | None, cuda: bool) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads = {threads} must be >= 1 (or None for ONNX Runtime's default)")
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only; ORT's warnings go to stderr unasked otherwise
    if cuda:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def _open_session(ort: Any, model_path: Path, provider: str, threads: int | None,
                  lift_mode: str | None = None) -> tuple[Any, str]:
    """(session, device). cuda demanded -> CUDA or an error; auto -> CUDA if it works, else CPU + one warning."""
    available = ort.get_available_providers()
    if provider == "cuda" and CUDA_EP not in available:
        raise ProviderError(
            f"provider='cuda' but this onnxruntime has no CUDA provider (it has {', '.join(available)}): "
            "install onnxruntime-gpu (pip install 'tablefree-onnx[gpu]', after uninstalling onnxruntime)"
        )
    if provider in ("cuda", "auto") and CUDA_EP in available:
        try:
            # CUDA alone: ORT refuses the CPU provider in the list once CPU fallback is disabled
            sess = ort.InferenceSession(str(model_path), _session_options(ort, threads, cuda=True),
                                        providers=[CUDA_EP])
            if sess.get_providers()[0] == CUDA_EP:
                return sess, "cuda"
            reason = "the CUDA provider did not load (check the CUDA and cuDNN libraries onnxruntime-gpu needs)"
        except Exception as e:  # a node without a CUDA kernel, with CPU fallback disabled
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = ("this artifact's bitwise lift has CPU kernels only: re-export with --code arith or lookup"
                    if lift_mode == "bitwise" else "re-export with --code arith, whose operators run on every provider")
            reason = f"the graph cannot run wholly on CUDA ({first[:300]}); {hint}"
        if provider == "cuda":
            raise ProviderError(f"provider='cuda': {reason}")
        _warn_fallback_once(reason)
    elif provider == "auto":
        _warn_fallback_once("onnxruntime has no CUDA provider (install onnxruntime-gpu for GPUs)")
    try:
        sess = ort.InferenceSession(str(model_path), _session_options(ort, threads, cuda=False), providers=[CPU_EP])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeArtifactError(f"ONNX Runtime cannot open {model_path}: {first[:300]}; re-export or re-download the folder") from None
    return sess, "cpu"


def _load_tokenizer(folder: Path) -> Tokenizer | None:
    path = folder / I.TOKENIZER_FILES[0]
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise RuntimeArtifactError(f"{path} cannot be read by tokenizers ({e}); re-export the folder") from None
    if tok.decoder is None:
        # SPEC 4: decoding is the concatenation of the token strings; without a decoder the
        # tokenizers library would join them with spaces.
        tok.decoder = decoders.Fuse()
    return tok


GRAPHS = ("auto", "kv", "spec")


def load(folder: str | Path, provider: str = "auto", threads: int | None = None, verify: str = "size",
         graph: str = "auto") -> Model:
    """Open an exported artifact folder. Checks the manifest (format, version, files, sizes;
    sha256 with verify="sha256") before ONNX Runtime reads a byte of the model.

    graph: "auto" generates (batches too) on the shared-cache graph (model.kv.onnx) when the
    artifact has one and the session runs on the CPU, and opens model.onnx only when `forward`
    needs it (then both sessions hold the weights); "spec" uses model.onnx alone; "kv" insists on
    model.kv.onnx. On CUDA "auto" means "spec": the
    kv graph is float32 and ONNX Runtime's CUDA GroupQueryAttention takes float16/bfloat16 only.
    """
    if provider not in PROVIDERS:
        raise ProviderError(f"provider={provider!r} is not one of {PROVIDERS}")
    if graph not in GRAPHS:
        raise InputError(f"graph={graph!r} is not one of {GRAPHS}")
    info = read_artifact(folder, verify=verify)
    has_kv = I.KV_MODEL_FILE in (info.manifest.get("files") or {}) and (info.folder / I.KV_MODEL_FILE).is_file()
    if graph == "kv" and not has_kv:
        raise RuntimeArtifactError(f"graph='kv' but {info.folder} has no {I.KV_MODEL_FILE}; re-export it with a current "
                                   "exporter, or load with graph='auto'")
    ort = _import_ort()
    tokenizer = _load_tokenizer(info.folder)
    lift_mode = (info.manifest.get("lift") or {}).get("mode")
    cuda_first = provider in ("cuda", "auto") and CUDA_EP in ort.get_available_providers()
    if has_kv and (graph == "kv" or (graph == "auto" and not cuda_first)):
        kv_session, device = _open_session(ort, info.folder / I.KV_MODEL_FILE, provider, threads, lift_mode)

        def open_spec() -> Any:
            return _open_session(ort, info.folder / I.MODEL_FILE, device, threads, lift_mode)[0]

        return Model(None, info, tokenizer, ort, device, kv_session=kv_session, open_spec=open_spec)
    session, device = _open_session(ort, info.folder / I.MODEL_FILE, provider, threads, lift_mode)
    return Model(session, info, tokenizer, ort, device)
