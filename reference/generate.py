"""The torch generation oracle: what the ONNX Runtime loop must reproduce token for token.

It uses the model's explicit KV cache exactly like the runtime (prefill once, then one token per
step). Sampling runs in numpy with `np.random.default_rng(seed)` and Hugging Face's filter order
(temperature, top_k, top_p), and draws by inverse CDF: one `rng.random()` per step scaled by the
total of exp(scores - max) and located in their cumulative sum (side "right"). A runtime that
draws the same way draws the same tokens. temperature 0 means greedy (the limit of sampling).

The returned list holds the NEW tokens only (not the prompt); when `eos_token_id` is drawn it is
included and generation stops. Generation also stops when the context (max_position_embeddings)
is full.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Scores after temperature, top-k and top-p (HF order); removed entries are -inf.

    top_k keeps every token whose score ties the k-th largest (like HF's `scores < kth`);
    top_p keeps the smallest set of highest-probability tokens whose mass reaches top_p (at least one).
    """
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature} must be > 0 here (0 is greedy: argmax)")
    scores = np.asarray(logits, dtype=np.float64) / float(temperature)
    if top_k and top_k > 0 and top_k < scores.size:
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending, like HF
        s = scores[order]
        p = np.exp(s - s[-1])
        cum = np.cumsum(p / p.sum())
        remove = cum <= (1.0 - top_p)
        remove[-1] = False
        scores = scores.copy()
        scores[order[remove]] = -np.inf
    return scores


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    scores = filter_logits(logits, temperature, top_k, top_p)
    cum = np.cumsum(np.exp(scores - scores.max()))
    u = rng.random() * cum[-1]
    return min(int(np.searchsorted(cum, u, side="right")), scores.size - 1)


@torch.no_grad()
def generate(model, input_ids: list[int], max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             eos_token_id: int | Iterable[int] | None = None) -> list[int]:
    """Continue `input_ids` (one sequence) by up to max_new_tokens; returns the new ids only."""
    cfg = model.cfg
    ids = [int(t) for t in input_ids]
    if not ids:
        raise ValueError("empty prompt: generation needs at least one token id (e.g. the bos id)")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside [0, {cfg.vocab_size}); use ids of this model's tokenizer")
    if len(ids) > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {len(ids)} tokens is longer than the context ({cfg.max_position_embeddings}); shorten it")
    stops = set() if eos_token_id is None else ({int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
    rng = np.random.default_rng(seed) if do_sample else None

    logits, past = model(torch.tensor([ids], dtype=torch.int64))
    out: list[int] = []
    while len(out) < max_new_tokens:
        last = logits[0, -1].numpy()
        nxt = sample_token(last, rng, temperature, top_k, top_p) if do_sample else int(np.argmax(last))
        out.append(nxt)
        if nxt in stops or len(ids) + len(out) >= cfg.max_position_embeddings or len(out) == max_new_tokens:
            break
        logits, past = model(torch.tensor([[nxt]], dtype=torch.int64), past_key_values=past)
    return out


__all__ = ["generate", "filter_logits", "sample_token"]
