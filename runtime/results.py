"""What the public calls return: GenerationResult, ScoreResult, ForwardOutput."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    token_logprobs: np.ndarray  # [len(ids) - 1] float64
    scored_ids: list[int] = field(repr=False, default_factory=list)

    @property
    def nll(self) -> float:
        return float(-np.mean(self.token_logprobs))

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))


@dataclass
class ForwardOutput:
    logits: np.ndarray  # [B, S, V] (or [B, min(logits_to_keep, S), V])
    past_key_values: list[Any]  # OrtValues [B, H, past + S, hs], layer-major, key then value: feed back as is
