"""The generation loop: prefill, then one decode step per token, on any DecodeCache.

`decode_steps` is the one place a decode step happens (`cache.step`), for generate and stream, single
prompts and batches, on either graph (speculative decoding's loop, for one prompt, is in
runtime/speculative.py). Text (incremental detokenization, stop strings) is tracked
per row by the callback that `text_tracker` builds, only when stop strings or streaming need it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from .cache import DecodeCache
from .detok import IncrementalDetokenizer
from .inputs import GenerationArgs
from .sampling import choose
from .speculative import PROMPT_LOOKUP, speculative_steps

OnToken = Callable[[int, int], None]


@dataclass
class Row:
    """Per-prompt state of a generation (text is only tracked when stop strings or streaming need it)."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    text: str = ""
    finish: str | None = None  # None while running, then "eos", "stop" or "length"


def right_padded(rows: list[Row], pad_token_id: int) -> np.ndarray:
    """[B, S] int64, S the longest prompt: row b's prompt first, pad_token_id after it."""
    S = max(len(r.prompt_ids) for r in rows)
    ids = np.full((len(rows), S), pad_token_id, np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r.prompt_ids)] = r.prompt_ids
    return ids


def decode_steps(cache: DecodeCache, rows: list[Row], args: GenerationArgs, pad_token_id: int,
           on_token: OnToken) -> Iterator[None]:
    """Generate into `rows`, yielding after each step's tokens (so stream can hand out text
    between Runs). `on_token(row_index, token)` handles text and stop strings and may set
    row.finish; the loop ends when every row has finished or at max_new_tokens. With
    args.speculative, one row on a cache that can verify runs runtime/speculative.py's loop (same
    output, fewer Runs); batches and model.onnx's cache decode plainly."""
    B = len(rows)
    if args.speculative == PROMPT_LOOKUP and B == 1 and hasattr(cache, "verify"):
        yield from speculative_steps(cache, rows[0], args, on_token)
        return
    last = cache.prefill(right_padded(rows, pad_token_id), [len(r.prompt_ids) for r in rows])  # [B, V]
    sampling = args.sampling
    rng = np.random.default_rng(args.seed) if not sampling.greedy else None
    history = [list(r.prompt_ids) for r in rows] if sampling.repetition_penalty != 1.0 else None
    end_ids = list(args.end_ids)
    end_set = set(end_ids)
    active = list(range(B))
    for step in range(args.max_new_tokens):
        banned = end_ids if step < args.min_new_tokens else ()
        tokens = choose(last, history, sampling, rng, banned)  # [B]
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
        if not active or step == args.max_new_tokens - 1:
            break
        if len(active) < B:  # finished rows run on in lock step, fed padding
            tokens[[i for i in range(B) if rows[i].finish is not None]] = pad_token_id
        last = cache.step(tokens)  # the decode step: [B] tokens in, [B, V] logits out
    for r in rows:
        if r.finish is None:
            r.finish = "length"


def text_tracker(rows: list[Row], stop_strs: tuple[str, ...], tokenizer: Tokenizer) -> OnToken:
    """on_token callback: incremental text per row, stop strings (which may span tokens)."""
    for r in rows:
        r.detok = IncrementalDetokenizer(tokenizer)
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


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not yet shown)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def stream_text(cache: DecodeCache, row: Row, args: GenerationArgs, pad_token_id: int,
                tokenizer: Tokenizer) -> Iterator[str]:
    """One prompt's continuation as text pieces; "".join(pieces) is generate's text. Text that
    could be the start of a stop string is held back until it is known not to be."""
    stop_strs = args.stop_strs
    track = text_tracker([row], stop_strs, tokenizer)
    pending: list[str] = []
    emitted = 0

    def safe_end(text: str) -> int:
        return len(text) - held_back(text, stop_strs)

    def on_token(i: int, t: int) -> None:
        nonlocal emitted
        track(i, t)
        end = len(row.text) if row.finish == "stop" else safe_end(row.text)
        if end > emitted:
            pending.append(row.text[emitted:end])
            emitted = end

    for _ in decode_steps(cache, [row], args, pad_token_id, on_token):
        if pending:
            yield "".join(pending)
            pending.clear()
    if row.finish != "stop":
        row.text += row.detok.flush()
    if len(row.text) > emitted:
        yield row.text[emitted:]
