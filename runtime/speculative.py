"""Prompt-lookup speculative decoding: guess the next tokens from text already seen, check them in one Run.

Why: a decode step of a small batch reads every weight once for one token; where that makes it
bound by memory bandwidth (the full-size model), feeding k + 1 tokens costs little more than one. When the continuation repeats
something in the prompt or in the text so far (quoting, editing, summarising, code), a guess taken
from there is often right, and each right guess is a token that did not need its own step.

The drafter (`PromptLookup`) finds the latest earlier occurrence of the last n tokens (n = 3, then
2, then 1) and proposes the k tokens that followed it. The loop (`speculative_steps`) feeds the
token just chosen plus the draft in one Run of the shared-cache graph (`SharedBufferCache.verify`),
which returns logits for every fed position; it then chooses tokens row by row exactly as plain
decoding would (`choose` from runtime/sampling.py, the same processors, the same random stream),
keeps going while the chosen token equals the drafted one, and lowers the cache's length past the
first disagreement (`SharedBufferCache.truncate`): positions past a row's length are never read, and
the next Run overwrites them before it attends to them.

The acceptance rule (`verify_token`): for a deterministic draft d (q = one-hot at d), the standard
speculative rule accepts d with probability min(1, p(d) / q(d)) = p(d) and otherwise samples from
the residual (p - q)+ normalised, i.e. p without d, renormalised. Drawing x ~ p once and accepting
iff x == d has exactly that law: P(accept) = p(d), and given a rejection x is distributed as p
restricted to tokens != d. Drawing it that way uses one uniform per emitted token, as plain
sampling does, so a seeded speculative run takes the same random numbers as a seeded plain one, and
greedy (the argmax) is the special case p = one-hot. The distribution of the output is unchanged.

Backing off: a wrong draft costs its fed positions. On the demo model (d 128, a 65,536-row head)
the head's matrix product grows with the positions fed: a verify Run of 2-5 tokens costs 1.2-1.5
steps and one of 9 about 2.3 (on a bandwidth-bound model it would cost about one). So the draft
length adapts as in Hugging Face's assisted generation: it starts at FIRST_DRAFT, grows by 2 (up
to DRAFT_TOKENS) after a draft accepted whole and shrinks by 1 (down to 1) after one that was not;
and after MISSES_BEFORE_PAUSE verifies in a row that accept nothing, drafting pauses for a number
of tokens that doubles each time (up to MAX_PAUSE), so text that never repeats pays about one
short verify per 64 tokens; an accepted draft sets the pause back to one token. The settings were
chosen by replaying the benchmark prompts' greedy continuations against several policies and
then measuring (benchmarks/RESULTS.md). Batches (B > 1) and caches without `verify` (model.onnx)
decode plainly. Not the default: on the demo model it loses up to 4% (CPU time) on some prompts
(sampling at temperature 0.8, where drafts are rarely accepted; a passage the model does not copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

import numpy as np

from .sampling import SamplingConfig, choose

if TYPE_CHECKING:  # loop.py imports this module
    from .inputs import GenerationArgs
    from .loop import Row

PROMPT_LOOKUP = "prompt_lookup"
MODES = ("off", PROMPT_LOOKUP)
MAX_NGRAM = 3  # longest n-gram matched first
MIN_NGRAM = 1  # shortest n-gram matched
DRAFT_TOKENS = 8  # the most tokens drafted per verify
FIRST_DRAFT = 2  # the draft length to start with; +2 after a draft accepted whole, -1 after one that was not
MISSES_BEFORE_PAUSE = 1
MAX_PAUSE = 64


class PromptLookup:
    """Drafts from the latest earlier occurrence of the text's last n tokens (n = max_ngram .. 1).

    An index maps each n-gram to the position after its latest occurrence, kept up to date as tokens
    are appended (O(max_ngram) per token), so a draft costs a few dict lookups, not a scan."""

    def __init__(self, tokens: Sequence[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        toks = self.tokens
        end = len(toks)  # the n-grams ending at end - 1 now have a follower: token, at `end`
        for n in range(1, min(self.max_ngram, end) + 1):
            self.index[tuple(toks[end - n:end])] = end
        toks.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        toks = self.tokens
        for n in range(min(self.max_ngram, len(toks)), self.min_ngram - 1, -1):
            start = self.index.get(tuple(toks[-n:]))
            if start is not None:
                return toks[start:start + k]
        return []


def verify_token(logits: np.ndarray, history: Sequence[Sequence[int]] | None, sampling: SamplingConfig,
                 rng: np.random.Generator | None, banned: Sequence[int], draft: int | None) -> tuple[int, bool]:
    """(token to emit, whether it is the drafted token): the speculative acceptance rule for a
    deterministic draft. logits [1, V] for this position; the token is `choose`'s (plain decoding's)
    draw, so P(accept) = p(draft) and a rejection's token follows the residual p without the draft,
    renormalised (module docstring)."""
    token = int(choose(logits, history, sampling, rng, banned)[0])
    return token, draft is not None and token == draft


@dataclass
class SpecStats:
    """What a speculative generation did (benchmarks/spec_bench.py reports it)."""

    runs: int = 0  # Runs after the prefill: plain steps plus verifies
    verifies: int = 0
    drafted: int = 0
    accepted: int = 0


def speculative_steps(cache: "VerifyCache", row: "Row", args: "GenerationArgs", on_token: Callable[[int, int], None],
                      stats: SpecStats | None = None, max_draft: int = DRAFT_TOKENS) -> Iterator[None]:
    """decode_steps for one row with prompt-lookup drafts: the same tokens (greedy) or the same
    distribution and random stream (sampling), eos / stop strings / min and max_new_tokens alike.
    Yields after each Run's tokens."""
    stats = stats if stats is not None else SpecStats()
    sampling = args.sampling
    rng = np.random.default_rng(args.seed) if not sampling.greedy else None
    history = [list(row.prompt_ids)] if sampling.repetition_penalty != 1.0 else None
    end_ids = list(args.end_ids)
    end_set = set(end_ids)
    n_max, n_min = args.max_new_tokens, args.min_new_tokens
    drafter = PromptLookup(row.prompt_ids)
    k, misses, pause, wait = min(FIRST_DRAFT, max_draft), 0, 1, 0  # back-off state (module docstring)

    def emit(t: int) -> bool:
        """Record a chosen token; True when the generation is over."""
        row.ids.append(t)
        drafter.append(t)
        if history is not None:
            history[0].append(t)
        if t in end_set:
            row.finish = "eos"
        else:
            on_token(0, t)
        return row.finish is not None or len(row.ids) >= n_max

    length = len(row.prompt_ids)  # tokens in the cache
    logits = cache.prefill(np.asarray([row.prompt_ids], np.int64))  # [1, V]: logits of one position
    drafts: list[int] = []
    while True:
        # logits[i]: the distribution after the fed tokens up to i; drafts[i]: the guess for it
        for i in range(logits.shape[0]):
            banned = end_ids if len(row.ids) < n_min else ()
            draft = drafts[i] if i < len(drafts) else None
            t, accepted = verify_token(logits[i:i + 1], history, sampling, rng, banned, draft)
            if emit(t):
                row.finish = row.finish or "length"
                yield
                return
            if not accepted:
                break
        if drafts:  # the cache keeps the token fed before the draft and the i drafts accepted
            stats.accepted += i
            length = base + 1 + i
            cache.truncate(length)
            k = min(max_draft, k + 2) if i == len(drafts) else max(1, k - 1)
            if i:
                misses, pause = 0, 1
            else:
                misses += 1
                if misses >= MISSES_BEFORE_PAUSE:
                    wait, pause, misses = pause, min(2 * pause, MAX_PAUSE), 0
        yield
        left = n_max - len(row.ids)  # tokens still allowed; t, the last one chosen, is not in the cache yet
        drafts = []
        if wait:
            wait -= 1
        elif left > 1:
            drafts = drafter.draft(min(k, left))
        stats.runs += 1
        base = length
        if drafts:
            # the last draft is checked by the row before it: it is fed only when its own row
            # (the token after it) may still be emitted
            fed = [t] + drafts[: left - 1]
            stats.verifies += 1
            stats.drafted += len(drafts)
            logits = cache.verify(np.asarray(fed, np.int64))  # [len(fed), V]
            length += len(fed)
        else:
            logits = cache.step(np.asarray([t], np.int64))  # [1, V]
            length += 1


class VerifyCache(Protocol):
    """What speculative_steps needs of a cache (runtime/cache.py's SharedBufferCache, batch 1)."""

    def prefill(self, ids: np.ndarray, lengths: Sequence[int] | None = None, all_positions: bool = False) -> np.ndarray:
        """ids [1, S] -> the last position's logits [1, V]."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [1] -> [1, V]."""

    def verify(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [S], appended in one Run -> every one's logits [S, V]."""

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens of the cache."""
