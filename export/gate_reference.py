"""The reference side of the parity gate (SPEC 5): the seeded inputs, the held-out text, and every
value the checks compare against, computed by the PyTorch reference before ONNX Runtime starts.

The two sequential parts (greedy decoding, sampling the held-out text) accept or correct what the
artifact proposes (`Proposal`, made by export/verify_draft.py): a right proposal makes each one
forward pass; the values are the reference's either way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from reference.config import ModelConfig
from reference.model import TableFreeLM

from .floors import PROMPT_TOKENS, greedy_tokens
from .gate_report import Laps
from .progress import Bar, NoBar

@torch.no_grad()
def ref_logits(lm: TableFreeLM, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = None if mask is None else torch.from_numpy(mask.astype(np.int64))
    return lm(ids_t, attention_mask=mask_t)[0].float().numpy()


HELD_ROWS, HELD_LEN = 4, 64  # held-out text: rows x positions (fewer positions in a short context: held_len)
HELD_SEED = 1234


def held_len(context: int) -> int:
    """Positions a held-out row has: HELD_LEN, or what fits beside the greedy prompt in a shorter
    context (the artifact proposes both in one lock-step batch, export/verify_draft.py)."""
    return min(HELD_LEN, context - PROMPT_TOKENS)


def heldout_text(folder: Path, vocab_size: int, log: Callable[[str], None] = lambda m: None,
                 length: int = HELD_LEN) -> np.ndarray | None:
    """Tail 10% of tinyshakespeare through the artifact's tokenizer, [HELD_ROWS, length]; None
    when the data or a tokenizer is missing (the held-out text is then sampled from the reference)."""
    try:
        from reference.data import shared_data_file
        from tokenizers import Tokenizer

        text_path = shared_data_file("tinyshakespeare.txt")
        tok_path = Path(folder) / "tokenizer.json"
        if tok_path.is_file():
            text = text_path.read_text(encoding="utf-8")
            tail = text[int(len(text) * 0.9):]
            ids = Tokenizer.from_file(str(tok_path)).encode(tail).ids
            ids = [t for t in ids if 0 <= t < vocab_size]
            if len(ids) >= HELD_ROWS * length:
                return np.array(ids[: HELD_ROWS * length], np.int64).reshape(HELD_ROWS, length)
    except Exception as e:  # missing data or tokenizer: fall back, say so
        log(f"  held-out text unavailable ({type(e).__name__}); sampling sequences from the fp32 reference")
    return None


def held_plan(vocab_size: int, length: int = HELD_LEN) -> tuple[np.ndarray, torch.Tensor]:
    """The randomness of the sampled held-out text, drawn in advance: the first token of each row
    [HELD_ROWS] and, per later position, the Exp(1) noise [length - 1, HELD_ROWS, V] that
    `torch.multinomial(probs, 1, generator)` draws from the same seeded generator (it samples as
    argmax(probs / noise)). So the text is exactly what the gate always sampled, and it is a
    function of the logits alone: whoever proposes it (export/verify_draft.py), the reference decides."""
    g = torch.Generator().manual_seed(HELD_SEED)
    first = torch.randint(0, vocab_size, (HELD_ROWS, 1), generator=g)[:, 0].numpy()
    noise = torch.stack([torch.empty(HELD_ROWS, vocab_size).exponential_(1, generator=g) for _ in range(length - 1)])
    return first, noise


def draw(logits: np.ndarray, noise: torch.Tensor) -> np.ndarray:
    """One token per row of `logits` [B, V]: argmax(softmax(logits) / noise), noise ~ Exp(1), an exact
    sample of softmax(logits) (the exponential race, i.e. Gumbel-max; torch.multinomial's own rule).
    Why a race and not an inverse CDF with fixed uniforms: two models whose logits differ by float32
    rounding then draw the same token unless the two best scores are that close; an inverse CDF
    moves every one of the V boundaries with the rounding (2 of 252 draws differed at V 65,536
    between ONNX Runtime and PyTorch on the same tiny model)."""
    probs = torch.softmax(torch.from_numpy(np.ascontiguousarray(logits, np.float32)), -1)
    return (probs / noise).argmax(-1).numpy().astype(np.int64)


@torch.no_grad()
def sample_from(lm: TableFreeLM, prefix: np.ndarray, noise: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Continue the rows of `prefix` [HELD_ROWS, k] to len(noise) + 1 tokens, drawing with `noise` (held_plan) through
    the KV cache; returns the ids [B, length] and the reference logits at every position [B, length, V]."""
    B, length = prefix.shape[0], noise.shape[0] + 1
    logits, past = lm(torch.from_numpy(prefix.astype(np.int64)))
    seen = [logits.float().numpy()]
    ids = prefix.astype(np.int64)
    while ids.shape[1] < length:
        t = ids.shape[1]
        nxt = draw(seen[-1][:, -1], noise[t - 1])
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        logits, past = lm(torch.from_numpy(nxt[:, None]), attention_mask=torch.ones(B, t + 1, dtype=torch.int64),
                          position_ids=torch.full((B, 1), t), past_key_values=past)
        seen.append(logits.float().numpy())
    return ids, np.concatenate(seen, axis=1)


def first_disagreement(picks: np.ndarray, proposed: np.ndarray) -> int | None:
    """The first position (last axis) where any row's reference pick differs from the proposal; None if none does."""
    bad = np.flatnonzero(np.atleast_2d(np.asarray(picks) != np.asarray(proposed)).any(0))
    return int(bad[0]) if bad.size else None


def heldout_tokens(lm: TableFreeLM, folder: Path, log: Callable, proposal: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, str, np.ndarray | None, int]:
    """(ids, source, logits, positions accepted from `proposal`): the tinyshakespeare tail
    (logits None: the caller computes them), else text sampled from the reference with
    `held_plan`'s randomness, with its reference logits [HELD_ROWS, length, V]; rows of
    held_len(context) positions.

    Sampling is sequential: 63 steps of the whole model. A `proposal` (the same sampling run on the
    artifact) turns that into one forward pass: the reference computes its logits for the proposed
    rows and draws each next token with the same noise; where every draw agrees, the proposal is
    exactly the reference's sample. From the first position where one does not, sampling goes on
    in the reference from the agreed prefix, as without a proposal."""
    length = held_len(lm.cfg.max_position_embeddings)
    ids = heldout_text(folder, lm.cfg.vocab_size, log, length)
    if ids is not None:
        return ids, "tinyshakespeare tail 10%", None, 0
    V = lm.cfg.vocab_size
    source = "sampled from the fp32 reference"
    first, noise = held_plan(V, length)
    prefix = first[:, None]
    if proposal is not None and proposal.shape == (HELD_ROWS, length) and np.array_equal(proposal[:, :1], prefix):
        logits = ref_logits(lm, proposal)
        picks = np.stack([draw(logits[:, t], noise[t]) for t in range(length - 1)], axis=1)
        k = first_disagreement(picks, proposal[:, 1:])
        if k is None:
            return proposal.astype(np.int64), source, logits, length
        del logits
        prefix = proposal[:, : k + 1]  # what the reference itself draws up to here
    ids, logits = sample_from(lm, prefix, noise)
    return ids, source, logits, prefix.shape[1] if proposal is not None else 0

@dataclass
class Expected:
    """Everything the gate needs from the PyTorch reference, computed before ONNX Runtime starts.

    Why: holding the reference and an ONNX Runtime session of the same 0.5B model at once doubles
    the build's peak memory; with these few arrays in hand the build frees the reference first.
    """

    cfg: ModelConfig
    batch_ids: np.ndarray
    batch_logits: np.ndarray
    seq_ids: np.ndarray
    seq_logits: np.ndarray
    prompt: list[int]
    greedy_tokens: list[int]
    padded_rows: list[list[int]]
    held_ids: np.ndarray
    held_source: str
    held_logits: np.ndarray
    table: np.ndarray | None = None  # a learned-table model's input table: the lift check compares its rows


def gate_inputs(vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int], list[list[int]]]:
    """The seeded ids of the checks: batch [2, 12], sequence [1, 16], greedy prompt (8), padded rows (5 and 9)."""
    rng = np.random.default_rng(seed)
    V = vocab_size
    batch_ids = rng.integers(0, V, size=(2, 12))
    seq_ids = rng.integers(0, V, size=(1, 16))
    prompt = [int(x) for x in rng.integers(0, V, size=PROMPT_TOKENS)]
    padded_rows = [[int(x) for x in rng.integers(0, V, size=n)] for n in (5, 9)]
    return batch_ids, seq_ids, prompt, padded_rows


@dataclass
class Proposal:
    """Token sequences the artifact proposes for the reference's two sequential computations (its
    greedy continuation of the prompt, its sampled held-out text); the reference accepts or
    corrects them (`expectations`), so they cost time when wrong, never correctness."""

    greedy: list[int]
    held_ids: np.ndarray | None = None


def reference_greedy(lm: TableFreeLM, prompt: list[int], proposal: list[int] | None) -> tuple[list[int], int]:
    """(the reference's greedy continuation of `prompt`, greedy_tokens(context) tokens; how many of
    `proposal` it accepted). With a proposal: one forward pass over prompt + proposal gives the
    reference's next-token logits after every proposed prefix; the continuation is the proposal up
    to the first position whose argmax differs, then reference.generate.generate from there."""
    from reference.generate import generate

    n = greedy_tokens(lm.cfg.max_position_embeddings)
    k, proposal = 0, [int(t) for t in proposal or []]
    if len(proposal) == n:
        logits = ref_logits(lm, np.array([prompt + proposal[:-1]], np.int64))[0, len(prompt) - 1:]
        bad = first_disagreement(logits.argmax(-1), np.array(proposal))
        if bad is None:
            return proposal, n
        k = bad
    return proposal[:k] + list(generate(lm, prompt + proposal[:k], n - k, do_sample=False)), k


def expectations(lm: TableFreeLM, folder: Path, log: Callable[[str], None] = print, seed: int = 0,
                 bar: Bar | None = None, laps: Laps | None = None, proposal: Proposal | None = None) -> Expected:
    """Run the reference side of every check (SPEC 5) on seeded inputs (each part a phase of `laps`).

    `proposal` (export/verify_draft.py) makes the two sequential parts, greedy decoding and sampling
    the held-out text, one forward pass each when the artifact proposed what the reference computes;
    the values are the reference's either way."""
    bar = bar or NoBar()
    laps = laps if laps is not None else Laps()

    lm.eval()
    cfg = lm.cfg
    batch_ids, seq_ids, prompt, padded_rows = gate_inputs(cfg.vocab_size, seed)
    held_ids, held_source, held_logits, held_ok = heldout_tokens(
        lm, folder, log, proposal.held_ids if proposal is not None else None)
    bar.advance(1, "reference: held-out text")
    if held_logits is None:
        laps("reference: held-out text (tokenized)")
    else:
        laps(f"reference: held-out text sampled, with logits (proposal: {held_ok}/{held_ids.shape[1]} positions accepted)"
             if proposal is not None and proposal.held_ids is not None else "reference: held-out text sampled, with logits")
    batch_logits = ref_logits(lm, batch_ids)
    bar.advance(1, "reference: batch")
    laps("reference: batch logits")
    seq_logits = ref_logits(lm, seq_ids)
    bar.advance(1, "reference: sequence")
    laps("reference: sequence logits")
    greedy, greedy_ok = reference_greedy(lm, prompt, proposal.greedy if proposal is not None else None)
    bar.advance(1, "reference: greedy")
    laps(f"reference: greedy {len(greedy)} tokens" +
         (f" (proposal: {greedy_ok}/{len(greedy)} accepted)" if proposal is not None else ""))
    if held_logits is None:  # sampled text brought its logits along
        held_logits = ref_logits(lm, held_ids)
    bar.advance(1, "reference: held-out logits")
    laps("reference: held-out logits")
    return Expected(cfg=cfg, batch_ids=batch_ids, batch_logits=batch_logits, seq_ids=seq_ids, seq_logits=seq_logits,
                    prompt=prompt, greedy_tokens=greedy, padded_rows=padded_rows, held_ids=held_ids,
                    held_source=held_source, held_logits=held_logits,
                    table=lm.embed_tokens.weight.detach().numpy() if cfg.input_table else None)

