"""Next-token choice in numpy, with the filters of Hugging Face transformers in its order.

Processors first (repetition penalty, then the min_new_tokens ban on end tokens), then, when
sampling, the warpers: temperature, top_k, top_p. Matching that order matters: top_p after
temperature keeps a different set of tokens than top_p before it, and users compare with HF.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np



@dataclass(frozen=True)
class SamplingConfig:
    """The filters' settings; runtime/inputs.check_sampling builds checked ones from a call's arguments."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        """temperature 0 is the limit of sampling: the argmax, so it is greedy by definition."""
        return not self.do_sample or self.temperature == 0


def apply_repetition_penalty(scores: np.ndarray, history: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """CTRL's penalty as in HF: a seen token's logit is divided by p if positive, times p if negative."""
    if penalty == 1.0:
        return scores
    for row, seen in enumerate(history):
        if len(seen) == 0:
            continue
        ids = np.unique(np.asarray(seen, dtype=np.int64))
        s = scores[row, ids]
        scores[row, ids] = np.where(s < 0, s * penalty, s / penalty)
    return scores


def apply_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep every token whose score is >= the k-th largest (ties at the boundary stay, as in HF)."""
    V = scores.shape[-1]
    if k <= 0 or k >= V:
        return scores
    kth = np.partition(scores, V - k, axis=-1)[:, V - k : V - k + 1]
    return np.where(scores < kth, -np.inf, scores)


# top_p sorts only the most likely 1,024 (else 8,192) tokens when they already hold p of the mass
# (the usual case for a trained model): a full argsort of a 65,536-token row costs several ms a
# token, a whole int4 decode step
TOP_P_CANDIDATES = (1024, 8192)


def _top_p_sorted(scores: np.ndarray, p: float) -> np.ndarray:
    """The reference form of the nucleus filter: one ascending stable sort of the whole row."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending
    s = np.take_along_axis(scores, order, axis=-1)
    e = np.exp(s - s[:, -1:])
    cum = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
    remove_sorted = cum <= (1.0 - p)
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def _top_p_row(row: np.ndarray, p: float, m: int) -> np.ndarray | None:
    """The same filter from the m largest scores alone, or None when it cannot be decided there
    (the m hold less than p of the mass, or a score ties across the cut)."""
    V = row.shape[0]
    part = np.argpartition(row, V - m)
    top, rest = part[V - m:], part[: V - m]
    if row[rest].max() >= row[top].min():  # a tie across the cut: the stable order decides, sort all
        return None
    e = np.exp(row - row.max())
    z = e.sum()
    order = top[np.lexsort((top, row[top]))]  # ascending by score, ties by index: the stable sort's order
    mass = e[order]
    below = (z - mass.sum()) / z  # everything outside the m, which sorts first
    if 1.0 - below < p:
        return None
    cum = below + np.cumsum(mass / z)
    keep = cum > (1.0 - p)
    keep[-1] = True
    out = np.full_like(row, -np.inf)
    out[order[keep]] = row[order[keep]]
    return out


def apply_top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter as in HF: drop the low tail whose total probability is <= 1 - p; keep >= 1 token."""
    if p >= 1.0:
        return scores
    rows: list[np.ndarray | None] = [None] * scores.shape[0]
    for m in TOP_P_CANDIDATES:
        if scores.shape[-1] <= 2 * m:
            break
        rows = [_top_p_row(x, p, m) if r is None else r for x, r in zip(scores, rows)]
    if any(r is None for r in rows):
        full = _top_p_sorted(scores, p)
        rows = [full[i] if r is None else r for i, r in enumerate(rows)]
    return np.stack(rows)


def process_logits(logits: np.ndarray, history: Sequence[Sequence[int]] | None, cfg: SamplingConfig,
                   banned: Sequence[int] = ()) -> np.ndarray:
    """[B, V] logits -> [B, V] float64 scores with filtered tokens at -inf, in HF's order."""
    scores = np.array(logits, dtype=np.float64)  # a copy: the caller's logits stay untouched
    if history is not None:
        scores = apply_repetition_penalty(scores, history, cfg.repetition_penalty)
    if len(banned):
        scores[:, np.asarray(banned, dtype=np.int64)] = -np.inf
    if cfg.greedy:
        return scores
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    scores = apply_top_k(scores, int(cfg.top_k))
    return apply_top_p(scores, cfg.top_p)


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(scores); -inf entries have probability exactly 0."""
    e = np.exp(scores - scores.max(-1, keepdims=True))
    cum = np.cumsum(e, axis=-1)
    u = rng.random(scores.shape[0]) * cum[:, -1]
    out = np.array([np.searchsorted(cum[r], u[r], side="right") for r in range(scores.shape[0])], dtype=np.int64)
    return np.minimum(out, scores.shape[-1] - 1)


def choose(logits: np.ndarray, history: Sequence[Sequence[int]] | None, cfg: SamplingConfig,
           rng: np.random.Generator | None, banned: Sequence[int] = ()) -> np.ndarray:
    """The next token of every row. Greedy without processors is a bare argmax (the fast path)."""
    if cfg.greedy and cfg.repetition_penalty == 1.0:
        best = logits.argmax(-1).astype(np.int64)
        if not len(banned) or not np.isin(best, banned).any():
            return best
        masked = logits.copy()  # only when a banned token won: keep the common step cheap
        masked[:, np.asarray(banned, dtype=np.int64)] = -np.inf
        return masked.argmax(-1).astype(np.int64)
    scores = process_logits(logits, history, cfg, banned)
    if cfg.greedy:
        return scores.argmax(-1).astype(np.int64)
    assert rng is not None
    return sample(scores, rng)
