"""Checks of every public argument (types and ranges), each a one-line InputError, all before any Run.

Why strict types: Python's duck typing turns mistakes into plausible calls. A dict prompt iterates
as its keys (a batch of them), bytes iterate as ints (token ids), True is 1, `top_k=2.5` truncates
and NaN compares False with everything, so a range check written as `x < 0` lets it through. Each
check here says what it got and what would be accepted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError
from .sampling import SamplingConfig
from .speculative import MODES as SPECULATIVE_MODES

_TEXT_HINT = "decode bytes first (e.g. data.decode('utf-8')) and pass a str"


def is_int(x: Any) -> bool:
    """A Python or numpy integer; bool is not a count or a token id, though Python says it is an int."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _shown(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 40 else f"{type(x).__name__} {text[:37]}..."


def check_int(name: str, x: Any, lo: int, hi: int | None = None, hint: str = "") -> int:
    """An integer in [lo, hi]; floats (even 2.0), bools, None and strings are refused."""
    if not is_int(x) or x < lo or (hi is not None and x > hi):
        where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name} = {_shown(x)} must be an integer {where}{hint}")
    return int(x)


def check_real(name: str, x: Any, lo: float, lo_open: bool = False, hi: float | None = None, hint: str = "") -> float:
    """A finite real number in the range; NaN, inf, bools and strings are refused."""
    ok = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
    if ok:
        v = float(x)
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
    if not ok:
        where = ("> " if lo_open else ">= ") + f"{lo:g}" if hi is None else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise InputError(f"{name} = {_shown(x)} must be a finite number {where}{hint}")
    return float(x)


def check_bool(name: str, x: Any) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise InputError(f"{name} = {_shown(x)} must be True or False")
    return bool(x)


def check_text(text: Any, what: str = "prompt") -> str:
    """A str the tokenizer can take: lone surrogates (what undecodable bytes become in argv) are refused."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a str, got {type(text).__name__}; {_TEXT_HINT}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} must be valid Unicode text: character {e.start} is a lone surrogate "
                         f"({text[e.start]!r}, from undecodable bytes?); {_TEXT_HINT}") from None
    return text


def check_ids(ids: Any, vocab_size: int, what: str = "prompt") -> list[int]:
    """A flat list (or tuple, or 1-D integer array) of token ids in [0, vocab_size)."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"{what} must be text or a flat list of integer token ids, got {ids.dtype} of shape {ids.shape}")
        values = [int(x) for x in ids]
    elif isinstance(ids, (list, tuple)):
        bad = next((x for x in ids if not is_int(x)), None)
        if bad is not None:
            raise InputError(f"{what} must be text or a flat list of integer token ids; it holds {_shown(bad)}")
        values = [int(x) for x in ids]
    else:
        raise InputError(f"{what} must be text or a list of integer token ids, got {type(ids).__name__}; {_TEXT_HINT}"
                         if isinstance(ids, (bytes, bytearray)) else
                         f"{what} must be text or a list of integer token ids, got {type(ids).__name__}")
    if not values:
        raise InputError(f"empty {what}: give at least one token (text that encodes to no tokens counts as empty)")
    for pos, t in enumerate(values):
        if not 0 <= t < vocab_size:
            raise InputError(f"token id {t} at position {pos} of the {what} is outside [0, {vocab_size}); "
                             "use ids of this model's tokenizer")
    return values


def prompt_rows(prompt: Any, encode: Callable[[str], list[int]], vocab_size: int) -> tuple[list[list[int]], bool]:
    """(token rows, is_batch). A str or a list of ints is one prompt; a list of those is a batch."""
    if isinstance(prompt, str):
        return [check_ids(encode(check_text(prompt)), vocab_size)], False
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1:
        return [check_ids(prompt, vocab_size)], False
    if not isinstance(prompt, (list, tuple, np.ndarray)):
        raise InputError(f"prompt must be a str, a list of token ids, or a list of those; got {type(prompt).__name__}"
                         + (f"; {_TEXT_HINT}" if isinstance(prompt, (bytes, bytearray)) else ""))
    items = list(prompt)
    if not items:
        raise InputError("empty prompt: give a string, a list of token ids, or a list of prompts")
    if not any(isinstance(x, (str, list, tuple, np.ndarray)) for x in items):  # flat: ids (check_ids names a stray)
        return [check_ids(items, vocab_size)], False
    rows = []
    for n, p in enumerate(items):
        what = f"prompt {n} of the batch"
        if isinstance(p, str):
            rows.append(check_ids(encode(check_text(p, what)), vocab_size, what))
        elif isinstance(p, (list, tuple, np.ndarray)):
            rows.append(check_ids(p, vocab_size, what))
        else:
            raise InputError(f"{what} is {_shown(p)}: a prompt is a str or a list of token ids, "
                             "and a batch is a list of those")
    return rows, True


def check_sampling(do_sample: Any, temperature: Any, top_k: Any, top_p: Any, repetition_penalty: Any) -> SamplingConfig:
    return SamplingConfig(
        do_sample=check_bool("do_sample", do_sample),
        temperature=check_real("temperature", temperature, 0.0, hint=" (0 means greedy)"),
        top_k=check_int("top_k", top_k, 0, hint=" (0 turns it off)"),
        top_p=check_real("top_p", top_p, 0.0, lo_open=True, hi=1.0, hint=" (1 turns it off)"),
        repetition_penalty=check_real("repetition_penalty", repetition_penalty, 0.0, lo_open=True, hint=" (1 turns it off)"),
    )


@dataclass(frozen=True)
class GenerationArgs:
    """A generate/stream call's arguments, checked. stop ids are merged into end_ids (they stop like EOS)."""

    max_new_tokens: int
    min_new_tokens: int
    sampling: SamplingConfig
    seed: int | None
    end_ids: tuple[int, ...]
    stop_strs: tuple[str, ...]
    speculative: str = "off"  # runtime/speculative.py's MODES


def check_generation_args(max_new_tokens: Any, do_sample: Any, temperature: Any, top_k: Any, top_p: Any,
                          repetition_penalty: Any, min_new_tokens: Any, stop: Any, seed: Any,
                          eos_token_ids: Sequence[int], vocab_size: int, speculative: Any = "off") -> GenerationArgs:
    if speculative is None:
        speculative = "off"
    if not isinstance(speculative, str) or speculative not in SPECULATIVE_MODES:
        raise InputError(f"speculative = {_shown(speculative)} must be one of {SPECULATIVE_MODES} (or None for off)")
    n = check_int("max_new_tokens", max_new_tokens, 1)
    m = check_int("min_new_tokens", min_new_tokens, 0, n, hint=" (at most max_new_tokens)")
    sampling = check_sampling(do_sample, temperature, top_k, top_p, repetition_penalty)
    if seed is not None:
        seed = check_int("seed", seed, 0, hint=" (or None)")
    if stop is None:
        stops: list[Any] = []
    elif isinstance(stop, (str, np.integer, int)) and not isinstance(stop, bool):
        stops = [stop]
    elif isinstance(stop, (list, tuple)):
        stops = list(stop)
    else:
        raise InputError(f"stop = {_shown(stop)} must be a str, a token id, or a list of those")
    stop_strs, stop_ids = [], []
    for s in stops:
        if isinstance(s, str):
            if s == "":
                raise InputError("an empty stop string would stop at once; remove it")
            stop_strs.append(check_text(s, "a stop string"))
        elif is_int(s):
            stop_ids.append(s)
        else:
            raise InputError(f"stop holds {_shown(s)}: each stop is a str or an integer token id")
    end_ids = list(eos_token_ids) + (check_ids(stop_ids, vocab_size, "stop ids") if stop_ids else [])
    return GenerationArgs(n, m, sampling, seed, tuple(dict.fromkeys(end_ids)), tuple(stop_strs), speculative)


def check_load_args(folder: Any, provider: Any, providers: Sequence[str], threads: Any, verify: Any,
                    verify_modes: Sequence[str], graph: Any, graphs: Sequence[str]) -> None:
    """runtime.load's arguments, before the folder is read (threads=0 is the caller's mistake, not the folder's)."""
    from os import PathLike

    from .errors import ProviderError

    if not isinstance(folder, (str, PathLike)):
        raise InputError(f"folder = {_shown(folder)} must be a path (str or pathlib.Path) to an artifact folder")
    if provider not in providers:
        raise ProviderError(f"provider={provider!r} is not one of {tuple(providers)}")
    if threads is not None:
        check_int("threads", threads, 1, hint=" (or None for ONNX Runtime's default)")
    if verify not in verify_modes:
        raise InputError(f"verify={verify!r} is not one of {tuple(verify_modes)}")
    if graph not in graphs:
        raise InputError(f"graph={graph!r} is not one of {tuple(graphs)}")


def as_int64(x: Any, name: str) -> np.ndarray:
    """A 2-D [batch, seq] int64 array (forward's input_ids, attention_mask, position_ids)."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.int64:
            raise InputError(f"{name} has dtype {x.dtype}; the graph takes int64 (use np.asarray(x, dtype=np.int64))")
        arr = x
    else:
        if isinstance(x, (str, bytes, bytearray, dict)) or x is None:
            raise InputError(f"{name} must be a 2-D int64 array [batch, seq], got {type(x).__name__}")
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError):
            arr = None
        if arr is None or arr.dtype == object:
            raise InputError(f"{name}: rows of unequal length or non-integer values; pad the rows and pass an attention_mask")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{name} holds {arr.dtype} values; the graph takes int64 token ids / positions")
        arr = arr.astype(np.int64)
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D [batch, seq], got shape {arr.shape}")
    return np.ascontiguousarray(arr)
