"""One request as the scheduler runs it (GenRequest), what it tells its owner (Event), and what it
makes of each token chosen for it: the log-probabilities asked for, the text (the runtime's
incremental detokenizer, with text that could begin a stop string held back, as `Model.stream`
does; stops.py finds them), and its finish. The scheduler (engine.py) decides when a request runs
and chooses its tokens; nothing here touches ONNX Runtime or another request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..sampling import SamplingConfig
from .logprobs import token_logprobs
from .stops import StopScanner


class QueueFullError(Exception):
    """More requests wait than the server's queue holds (HTTP 429)."""


class ShuttingDownError(Exception):
    """The scheduler stopped or is stopping (HTTP 503)."""


@dataclass
class Event:
    """What the scheduler tells a request's owner. kind "token": `text` (possibly "", when the
    text is held back or incomplete) for `token` (with `logprob`/`top` when asked for); kind
    "done": `finish` is "stop" or "length" ("cancelled"/"error" when it did not complete); kind
    "prompt" (before any token, when prompt_logprobs was asked): `prompt_logprobs[i]` and
    `prompt_top[i]` for prompt token i + 1 (the first token has no context)."""

    kind: str
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: dict[int, float] | None = None
    finish: str | None = None
    error: str | None = None
    prompt_logprobs: list[float] | None = None
    prompt_top: list[dict[int, float]] | None = None


@dataclass(eq=False)  # identity: two requests with the same prompt and tokens are still two
class GenRequest:
    """One choice of one prompt: what was asked (the fields up to prompt_logprobs, set by the HTTP
    side), then the scheduler's state for it (written on its thread only)."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: none; N >= 0: the chosen token's and the top N
    prompt_logprobs: bool = False  # the prompt tokens' too (with `logprobs`'s N): one "prompt" event
    # state (the scheduler's)
    ids: list[int] = field(default_factory=list)
    finish: str | None = None
    slot: int = -1
    cancelled: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float | None = None
    _detok: Any = None
    _text: str = ""
    _emitted: int = 0
    _rng: Any = None
    _fed: int = 0  # prompt tokens in the cache (a long prompt goes in pieces)
    _plp: list[float] = field(default_factory=list)  # prompt log-probabilities so far
    _ptop: list[dict[int, float]] = field(default_factory=list)
    cached: int = 0  # prompt tokens copied from the prefix cache instead of prefilled
    _hit: Any = None  # a Hit of the prefix cache found at admission (prefix.py)
    _stops: StopScanner | None = None

    def __post_init__(self) -> None:
        # built here, on the submitting side: a bad stop list fails its caller, not the scheduler thread
        self._stops = StopScanner(self.stop) if self.stop else None

    def add_token(self, token: int, logits: np.ndarray, end_ids: set[int], max_len: int) -> None:
        """The token chosen next (from `logits` [1, V]): its logprobs when asked, the finish it
        brings (end token, stop string, max_tokens, the context full), and the text that is now safe
        to hand out, in one "token" event; at the finish, also the text held back until then."""
        self.ids.append(token)
        lp, top = token_logprobs(logits[0], token, self.logprobs) if self.logprobs is not None else (None, None)
        if token in end_ids:  # the end token's own text is not part of the completion
            self.finish, piece = "stop", ""
        else:
            piece = self._new_text(token)
            if self.finish is None and (len(self.ids) >= self.max_tokens or
                                        len(self.prompt_ids) + len(self.ids) >= max_len):
                self.finish = "length"
        if self.finish is not None and self._detok is not None:
            if self.finish == "length" or token in end_ids:  # not a stop string: no stop can follow
                self._text += self._detok.flush()
            piece += self._text[self._emitted:]  # the held-back text
            self._emitted = len(self._text)
        self.emit(Event("token", piece, token, lp, top))

    def _new_text(self, token: int) -> str:
        """The new text that is safe to hand out (nothing that could begin a stop string)."""
        if self._detok is None:
            return ""
        piece = self._detok.add(token)
        if not piece:
            return ""
        self._text += piece
        end = len(self._text)
        if self._stops is not None:  # (stops.py: the cost per token does not grow with the stops' length)
            begin = self._stops.feed(piece)
            if begin is not None:
                self._text = self._text[:begin]
                self.finish = "stop"
                end = begin
            else:
                end -= self._stops.held
        out = self._text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out
