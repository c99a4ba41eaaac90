"""`load` an artifact folder and run it: the public `Model` (forward, generate, stream, score).

Two graphs can serve an artifact (runtime/cache.py has the two cache strategies): `model.onnx`
(SPEC 3: past_key_values in, present out) and `model.kv.onnx` (one shared cache buffer per layer),
when the exporter wrote one. generate, stream and score run on the kv graph when it serves (a batch
right-padded); `forward` (the SPEC 3 interface) runs on `model.onnx`, whose session then opens on
first use. Every check of the caller's input (runtime/inputs.py) runs before the first Run.
"""
from __future__ import annotations

import re

import threading
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
from tokenizers import Tokenizer, decoders

from . import interface as I
from .artifact import DEFAULT_VERIFY, VERIFY_MODES, ArtifactInfo, read_artifact
from .cache import Dims, Graph, SharedKVGraph, SpecGraph
from .errors import ContextLengthError, InputError, ProviderError, RuntimeArtifactError
from .inputs import (GenerationArgs, as_int64, check_generation_args, check_ids, check_int, check_load_args,
                     check_text, is_int, prompt_rows)
from .loop import Row, decode_steps, stream_text, text_tracker
from .onnx_proto import FLOAT16, ProtoError, graph_input_type, node_input_shapes
from .results import ForwardOutput, GenerationResult, ScoreResult
from .sessions import PROVIDERS, cuda_available, cuda_block_problem, import_ort, open_session, warn_fallback_once

Prompt = Union[str, Sequence[int]]
GRAPHS = ("auto", "kv", "spec")

__all__ = ["load", "Model", "GenerationResult", "ScoreResult", "ForwardOutput", "GRAPHS", "PROVIDERS"]


class Model:
    """A loaded artifact. Thread-safe: each call makes its own cache and bindings; the sessions are shared."""

    def __init__(self, session: Any, info: ArtifactInfo, tokenizer: Tokenizer | None, ort: Any, device: str,
                 kv_session: Any = None, open_spec: Callable[[], Any] | None = None):
        self.info = info
        self.tokenizer = tokenizer
        self._ort = ort
        self._device = device  # "cpu" or "cuda": where inputs, outputs and the cache live
        self.vocab_size = info.vocab_size
        self.num_layers = info.num_layers
        self.num_heads = info.num_heads
        self.head_size = info.head_size
        self.context_length = info.context_length
        self._dims = Dims(self.num_layers, self.num_heads, self.head_size, self.vocab_size, self.context_length)
        # model.onnx; None until first use when the kv graph serves generation
        self._spec: SpecGraph | None = SpecGraph(session, ort, device, info.folder, self._dims) if session is not None else None
        self._open_spec = open_spec
        self._spec_lock = threading.Lock()
        self._kv: SharedKVGraph | None = None
        if kv_session is not None:
            self._kv = SharedKVGraph(kv_session, ort, device, info.folder, self._dims)
            _check_rotary_context(self._kv, self.context_length)
        self.provider: str = (kv_session or session).get_providers()[0]
        eos = info.token_id("eos_token_id")
        eos_list = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        if not all(is_int(e) and 0 <= e < self.vocab_size for e in eos_list):
            raise RuntimeArtifactError(f"eos_token_id {eos!r} (generation_config.json / config.json) is not a token id "
                                       f"in [0, {self.vocab_size}); re-export the folder")
        self.eos_token_ids: list[int] = [int(e) for e in eos_list]
        pad = info.token_id("pad_token_id")
        if pad is not None and not (is_int(pad) and 0 <= pad < self.vocab_size):
            raise RuntimeArtifactError(f"pad_token_id {pad!r} is not a token id in [0, {self.vocab_size}); re-export the folder")
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    # -- graphs ----------------------------------------------------------------------------------
    @property
    def _spec_graph(self) -> SpecGraph:
        """model.onnx, opened (and checked) on first use when the kv graph serves generation."""
        if self._spec is None:
            with self._spec_lock:
                if self._spec is None:
                    self._spec = SpecGraph(self._open_spec(), self._ort, self._device, self.info.folder, self._dims)
        return self._spec

    @property
    def _generation_graph(self) -> Graph:
        return self._kv if self._kv is not None else self._spec_graph

    @property
    def session(self) -> Any:
        """The SPEC 3 graph's session (model.onnx). When the kv graph serves generation, this one
        opens on the first `forward` call: until then its weights are not in memory."""
        return self._spec_graph.session

    @property
    def kv_session(self) -> Any:
        """The shared-cache graph's session (model.kv.onnx), or None when model.onnx serves everything."""
        return self._kv.session if self._kv is not None else None

    @property
    def past_dtype(self) -> np.dtype:
        """model.onnx's cache dtype: what `forward` takes as numpy past_key_values."""
        return self._spec_graph.past_dtype

    @property
    def kv_past_dtype(self) -> np.dtype | None:
        """model.kv.onnx's cache dtype (float16 in fp16 artifacts), None without that graph."""
        return self._kv.past_dtype if self._kv is not None else None

    # -- tokens ----------------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            tok = self.info.manifest.get("tokenizer")
            if isinstance(tok, dict) and tok.get("runs_on") == "ids":  # the checkpoint's tokenizer is code
                raise RuntimeArtifactError(
                    f"{self.info.folder} runs on token ids only: its checkpoint's tokenizer is code ({tok.get('code')}) "
                    f"that {'no tokenizer.json reproduces exactly' if tok.get('check') else 'was not run at export'} "
                    "(manifest.json -> tokenizer); pass token ids encoded with the checkpoint's own tokenizer")
            raise RuntimeArtifactError(
                f"no tokenizer.json in {self.info.folder}: pass token ids instead of text, or re-export with the tokenizer"
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(check_text(text, "text")).ids

    def decode(self, ids: Sequence[int]) -> str:
        values = check_ids(ids, self.vocab_size, "ids") if len(ids) else []
        return self._need_tokenizer().decode(values, skip_special_tokens=False)

    # -- low level -------------------------------------------------------------------------------
    def forward(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Sequence[Any] | None = None, logits_to_keep: int = 0) -> ForwardOutput:
        """One checked Run of model.onnx. Arrays must be int64 (past: the graph's float type); the
        returned past_key_values are OrtValues that can be passed straight back. logits_to_keep =
        N > 0 returns logits for the last N positions only ([B, min(N, seq), V]); 0 returns all."""
        keep = check_int("logits_to_keep", logits_to_keep, 0, hint=" (0 keeps every position)")
        graph = self._spec_graph  # forward is the SPEC 3 interface: model.onnx (opened here on first use)
        ids = as_int64(input_ids, I.INPUT_IDS)  # [B, S]
        B, S = ids.shape
        if S == 0:
            raise InputError("input_ids has no tokens (seq = 0)")
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            raise InputError(f"input_ids holds {int(ids.flat[bad[0]])}, outside [0, {self.vocab_size})")
        past = self._check_past(past_key_values, B, graph) if past_key_values is not None else None
        P = 0 if past is None else past[0].shape()[2]
        if P + S > self.context_length:
            raise ContextLengthError(f"{P + S} positions exceed the model's context of {self.context_length}")
        mask = np.ones((B, P + S), np.int64) if attention_mask is None else as_int64(attention_mask, I.ATTENTION_MASK)
        if mask.shape != (B, P + S):
            raise InputError(f"attention_mask has shape {mask.shape}; expected [batch, past + seq] = {(B, P + S)}")
        if ((mask != 0) & (mask != 1)).any():
            raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
        if position_ids is None:
            pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -S:]  # [B, S]
        else:
            pos = as_int64(position_ids, I.POSITION_IDS)
        if pos.shape != (B, S):
            raise InputError(f"position_ids has shape {pos.shape}; expected [batch, seq] = {(B, S)}")
        if pos.size and (pos.min() < 0 or pos.max() >= self.context_length):
            raise ContextLengthError(f"position_ids must lie in [0, {self.context_length}) (the model's context)")
        logits, presents = graph.run(ids, np.ascontiguousarray(mask), np.ascontiguousarray(pos), past, keep)
        if keep and logits.shape[1] > keep:  # an older artifact without the input
            logits = logits[:, -keep:]
        return ForwardOutput(logits, presents)

    def _check_past(self, past_key_values: Any, batch: int, graph: SpecGraph) -> list[Any]:
        """Every layer's key and value: numpy arrays or OrtValues of the graph's dtype, [B, H, P, hs], one P."""
        names = I.past_names(self.num_layers)
        if not isinstance(past_key_values, (list, tuple)):
            raise InputError(f"past_key_values must be a list of {len(names)} arrays (key and value per layer), "
                             f"got {type(past_key_values).__name__}")
        if len(past_key_values) != len(names):
            raise InputError(f"past_key_values has {len(past_key_values)} tensors; this model needs {len(names)} "
                             "(key and value per layer)")
        want_type = "tensor(float16)" if graph.past_dtype == np.float16 else "tensor(float)"
        out, lengths = [], set()
        for p, name in zip(past_key_values, names):
            if isinstance(p, np.ndarray):
                if p.dtype != graph.past_dtype:
                    raise InputError(f"{name} has dtype {p.dtype}; this graph's cache is {graph.past_dtype}")
                shape = p.shape
            elif isinstance(p, self._ort.OrtValue):
                if p.data_type() != want_type:
                    raise InputError(f"{name} is {p.data_type()}; this graph's cache is {graph.past_dtype}")
                shape = tuple(p.shape())
            else:
                raise InputError(f"{name} is {type(p).__name__}; pass numpy arrays or the OrtValues forward returned")
            if len(shape) != 4 or shape[0] != batch or shape[1] != self.num_heads or shape[3] != self.head_size:
                raise InputError(f"{name} has shape {tuple(shape)}; expected [{batch}, {self.num_heads}, past, {self.head_size}]")
            lengths.add(shape[2])
            out.append(p)
        if len(lengths) > 1:
            raise InputError(f"past_key_values hold caches of different lengths {sorted(lengths)}; every layer's key and "
                             "value must cover the same past")
        return [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(p), self._device, 0)
                if isinstance(p, np.ndarray) else p for p in out]

    # -- generation ------------------------------------------------------------------------------
    def _prepare(self, prompt: Any, max_new_tokens: Any = 64, do_sample: Any = False, temperature: Any = 1.0,
                 top_k: Any = 0, top_p: Any = 1.0, repetition_penalty: Any = 1.0, min_new_tokens: Any = 0,
                 stop: Any = None, seed: Any = None, speculative: Any = None) -> tuple[list[Row], bool, GenerationArgs]:
        """Every check of a generate/stream call, before any Run: (rows, is_batch, checked args)."""
        args = check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
                                     min_new_tokens, stop, seed, self.eos_token_ids, self.vocab_size, speculative)
        if args.stop_strs:
            self._need_tokenizer()
        token_rows, is_batch = prompt_rows(prompt, lambda s: self._need_tokenizer().encode(s).ids, self.vocab_size)
        longest = max(len(r) for r in token_rows)
        if longest > self.context_length:
            raise ContextLengthError(
                f"prompt has {longest} tokens but the model's context is {self.context_length}; shorten the prompt"
            )
        if longest + args.max_new_tokens > self.context_length:
            raise ContextLengthError(
                f"prompt ({longest} tokens) + max_new_tokens ({args.max_new_tokens}) exceeds the model's context of "
                f"{self.context_length}; lower max_new_tokens to {self.context_length - longest} or shorten the prompt"
            )
        return [Row(prompt_ids=r) for r in token_rows], is_batch, args

    def _generation_steps(self, rows: list[Row], args: GenerationArgs, on_token: Callable[[int, int], None]) -> Iterator[None]:
        """generate's loop on a fresh cache of the generation graph (benchmarks/bench.py times it)."""
        longest = max(len(r.prompt_ids) for r in rows)
        cache = self._generation_graph.new_cache(len(rows), longest + args.max_new_tokens)
        return decode_steps(cache, rows, args, self.pad_token_id, on_token)

    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 min_new_tokens: int = 0, stop: str | int | Sequence[str | int] | None = None,
                 seed: int | None = None, speculative: str | None = None) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt (text or ids), or a list of prompts as one batch.

        Greedy unless do_sample. `stop` takes strings (matched in the text, even across tokens;
        the text ends before the match) and token ids (stop like EOS). Returns a GenerationResult,
        or a list of them for a batch.

        speculative="prompt_lookup" drafts the next tokens from earlier text and checks them in one
        Run (runtime/speculative.py): the same greedy tokens, the same sampling distribution (and,
        with a seed, the same random draws), faster on text that repeats its prompt. It needs the
        shared-cache graph and one prompt; a batch, or model.onnx alone, decodes plainly.
        """
        rows, is_batch, args = self._prepare(prompt, max_new_tokens, do_sample, temperature, top_k, top_p,
                                             repetition_penalty, min_new_tokens, stop, seed, speculative)
        on_token = text_tracker(rows, args.stop_strs, self.tokenizer) if args.stop_strs else (lambda i, t: None)
        for _ in self._generation_steps(rows, args, on_token):
            pass
        results = []
        for r in rows:
            if args.stop_strs:
                text = r.text if r.finish == "stop" else r.text + r.detok.flush()
            elif self.tokenizer is not None:
                text = self.decode(r.ids[:-1] if r.finish == "eos" else r.ids)
            else:
                text = ""
            results.append(GenerationResult(text=text, ids=r.ids, prompt_ids=r.prompt_ids, finish_reason=r.finish))
        return results if is_batch else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
               stop: str | int | Sequence[str | int] | None = None, seed: int | None = None,
               speculative: str | None = None) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece; "".join(...) == generate(...).text.

        The arguments are checked when stream is called, not when the first piece is asked for.
        Text that could be the start of a stop string is held back until it is known not to be.
        speculative as in generate (a verify that accepts a draft yields several tokens' text at once).
        """
        rows, is_batch, args = self._prepare(prompt, max_new_tokens, do_sample, temperature, top_k, top_p,
                                             repetition_penalty, min_new_tokens, stop, seed, speculative)
        if is_batch:
            raise InputError("stream takes one prompt; use generate for a batch")
        tokenizer = self._need_tokenizer()
        cache = self._generation_graph.new_cache(1, len(rows[0].prompt_ids) + args.max_new_tokens)
        return stream_text(cache, rows[0], args, self.pad_token_id, tokenizer)

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, text: str | Sequence[int]) -> ScoreResult:
        """Token log-probabilities and perplexity of a text, as the tokenizer splits it.

        The first token has no context and is not scored. Text longer than the context is cut
        into windows of context length that overlap by one token, so every other token is
        scored exactly once (with the context of its own window).
        """
        ids = check_ids(self.encode(text) if isinstance(text, str) else text, self.vocab_size, "text")
        if len(ids) < 2:
            raise InputError("text to score has fewer than 2 tokens; nothing to predict")
        C = self.context_length
        graph = self._generation_graph
        logps: list[np.ndarray] = []
        start = 0
        while start < len(ids) - 1:
            window = np.asarray(ids[start : start + C], np.int64)[None]  # [1, W]
            lg = graph.new_cache(1, window.shape[1]).prefill(window, all_positions=True)  # [1, W, V]
            lg = lg[0, :-1].astype(np.float64)  # [W - 1, V]: position i predicts token i + 1
            lg = lg - lg.max(-1, keepdims=True)
            logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
            logps.append(np.take_along_axis(logp, window[0, 1:, None], -1)[:, 0])
            start += C - 1
        return ScoreResult(ids=ids, token_logprobs=np.concatenate(logps), scored_ids=ids[1:])


def _check_rotary_context(graph: SharedKVGraph, context: int) -> None:
    """model.kv.onnx bakes the rotary tables in (cos_cache [positions, rotary_dim / 2]); a longer
    context in config.json would fail only once a generation passed the table's end. The table is
    GroupQueryAttention's cos_cache, or RotaryEmbedding's where the graph rotates in front of it
    (partial rotary, graphs/rotary.py)."""
    try:
        shapes = node_input_shapes(graph.path, "GroupQueryAttention", 7) + \
            node_input_shapes(graph.path, "RotaryEmbedding", 2)
    except (OSError, ProtoError) as e:
        raise RuntimeArtifactError(f"{graph.path} cannot be read as an ONNX graph ({e}); re-export the folder") from None
    for shape in shapes:
        if shape and shape[0] != context:
            raise RuntimeArtifactError(
                f"{graph.path}: the rotary cos_cache covers {shape[0]} positions but config.json's "
                f"max_position_embeddings = {context}; config and model disagree, re-export the folder"
            )


def _kv_cache_fp16(folder: Any) -> bool:
    """Whether model.kv.onnx's cache is float16 (read from the file, before any session opens)."""
    path = folder / I.KV_MODEL_FILE
    try:
        return graph_input_type(path, I.past_names(1)[0]) == FLOAT16
    except (OSError, ProtoError) as e:
        raise RuntimeArtifactError(f"{path} cannot be read as an ONNX graph ({e}); re-export the folder") from None


_BYTE_PIECE = re.compile(r"(<0x[0-9A-F]{2}>)+")


def _load_tokenizer(info: ArtifactInfo) -> Tokenizer | None:
    path = info.folder / I.TOKENIZER_FILES[0]
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
    # Ids past the model's vocabulary are allowed only as byte pieces `<0xHH>` (and their merged runs): the tokenizer.json the
    # exporter ships for onnxruntime-genai carries them (export/tokenizer_files.py), and this library
    # never emits them (no byte fallback). Anything else there means tokenizer and model disagree.
    beyond = [t for t, i in tok.get_vocab(with_added_tokens=True).items() if i >= info.vocab_size]
    if any(not _BYTE_PIECE.fullmatch(t) for t in beyond):
        raise RuntimeArtifactError(f"{path} has token ids up to {max(tok.get_vocab().values())} but config.json's "
                                   f"vocab_size = {info.vocab_size}; tokenizer and model disagree, re-export the folder")
    return tok


def load(folder: str | Any, provider: str = "auto", threads: int | None = None, verify: str = DEFAULT_VERIFY,
         graph: str = "auto") -> Model:
    """Open an exported artifact folder.

    verify: "sha256" (default) refuses a folder whose manifest does not list, with a sha256, every
    file the runtime reads, and checks every hash before ONNX Runtime reads a byte of the model;
    hashes that matched once are remembered per file stamp (runtime/integrity.py), so a repeated
    load costs a stat per file. "size" checks the listing and the sizes only; "none" nothing.

    graph: "auto" generates (batches too) on the shared-cache graph (model.kv.onnx) when the
    artifact has one and the session runs on the CPU, and opens model.onnx only when `forward`
    needs it (then both sessions hold the weights); "spec" uses model.onnx alone; "kv" insists on
    model.kv.onnx. On CUDA "auto" picks the kv graph only when its cache is float16 (fp16
    artifacts): ONNX Runtime's CUDA GroupQueryAttention takes float16/bfloat16 only, so a float32
    kv graph there would run its attention on the CPU; those artifacts use model.onnx on CUDA.
    """
    check_load_args(folder, provider, PROVIDERS, threads, verify, VERIFY_MODES, graph, GRAPHS)
    info = read_artifact(folder, verify=verify)
    has_kv = info.listed(I.KV_MODEL_FILE) and (info.folder / I.KV_MODEL_FILE).is_file()
    if graph == "kv" and not has_kv:
        raise RuntimeArtifactError(f"graph='kv' but {info.folder} has no {I.KV_MODEL_FILE}; re-export it with a current "
                                   "exporter, or load with graph='auto'")
    ort = import_ort()
    tokenizer = _load_tokenizer(info)
    lift_mode = (info.manifest.get("lift") or {}).get("mode")
    cuda_first = provider in ("cuda", "auto") and cuda_available(ort)
    block = cuda_block_problem(info.manifest) if cuda_first else None
    if block and provider == "cuda":
        raise ProviderError(f"provider='cuda': {block}")
    if block:  # auto: the CPU, said once
        warn_fallback_once(f"{info.folder.name} cannot run on CUDA ({block})")
        provider, cuda_first = "cpu", False
    if has_kv and (graph == "kv" or (graph == "auto" and (not cuda_first or _kv_cache_fp16(info.folder)))):
        kv_session, device = open_session(ort, info.folder / I.KV_MODEL_FILE, provider, threads, lift_mode)

        def open_spec() -> Any:
            return open_session(ort, info.folder / I.MODEL_FILE, device, threads, lift_mode)[0]

        return Model(None, info, tokenizer, ort, device, kv_session=kv_session, open_spec=open_spec)
    session, device = open_session(ort, info.folder / I.MODEL_FILE, provider, threads, lift_mode)
    return Model(session, info, tokenizer, ort, device)
