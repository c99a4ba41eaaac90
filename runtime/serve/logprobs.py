"""Log-probabilities for `/v1/completions`' `logprobs`: a generated token's, a prompt's (echo with
logprobs, what lm-evaluation-harness's loglikelihood tasks read), and the prompt's entries in
OpenAI's legacy shape. One formula for both (float64 log_softmax of the raw logits), so a prompt
token and a generated token with the same logits get the same value, and the top entry of a
position ties the chosen token's value exactly where it is the chosen token.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..detok import IncrementalDetokenizer


def token_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, dict[int, float]]:
    """log_softmax of logits [V]: the token's value and the top n (id -> logprob, highest first)."""
    lps, tops = prompt_logprobs(logits[None], [token], n)
    return lps[0], tops[0]


def prompt_logprobs(logits: np.ndarray, targets: Sequence[int], n: int,
                    rows: int = 16) -> tuple[list[float], list[dict[int, float]]]:
    """log_softmax of each row of logits [c, V], `rows` rows at a time (a prompt's piece never
    holds more than rows x V float64 at once): each target's value and the top n of its row."""
    lps: list[float] = []
    tops: list[dict[int, float]] = []
    for r0 in range(0, len(targets), rows):
        x = logits[r0 : r0 + rows].astype(np.float64)
        x -= x.max(-1, keepdims=True)
        x -= np.log(np.exp(x).sum(-1, keepdims=True))
        t = np.asarray(targets[r0 : r0 + rows], np.int64)
        lps += [float(v) for v in x[np.arange(len(t)), t]]
        if not n:
            tops += [{} for _ in t]
            continue
        for row, ix in zip(x, np.argpartition(-x, n, axis=-1)[:, :n]):
            ix = ix[np.argsort(-row[ix])]
            tops.append({int(i): float(row[i]) for i in ix})
    return lps, tops


def prompt_entries(tokenizer: Any, decode: Callable[[list[int]], str], ids: list[int], lps: list[float],
                   tops: list[dict[int, float]]) -> tuple[list[str], list[float | None], list[dict[str, float] | None], list[int]]:
    """(tokens, token_logprobs, top_logprobs, text_offset) of an echoed prompt: the first token has
    no context, so its value and its top are None (null). A token's offset is where its text starts
    in the echoed text as the incremental detokenizer splits it (a byte piece that ends inside a
    character starts where that character does)."""
    detok = None if tokenizer is None else IncrementalDetokenizer(tokenizer)
    offsets, at = [], 0
    for t in ids:
        offsets.append(at)
        if detok is not None:
            at += len(detok.add(t))
    top = [{decode([t]): lp for t, lp in d.items()} for d in tops]
    return [decode([t]) for t in ids], [None, *lps], [None, *top], offsets
