"""The artifact proposes, the reference decides: drafts for the gate's two sequential reference parts.

Why: the reference side of the gate decodes greedily (64 tokens) and samples the held-out text
(4 rows x 63 tokens) one step at a time in PyTorch eager, about 0.1 s (batch 1) and 0.25 s
(batch 4) a step at full size: 23 s of a 54 s gate (benchmarks/RESULTS.md, "Full-size export").
The artifact runs the same decoding 2-3x faster per step through ONNX Runtime, so it proposes both
token sequences first (one batch, in lock step, its session closed before the reference loads);
`expectations` then checks every proposed token with one reference forward pass per sequence and
continues in the reference from the first token it would not have chosen. What the checks compare
against is the reference's decoding either way; a wrong artifact only makes the gate slower.

Only float32 and float16 artifacts propose: a quantized one disagrees within a few tokens (its
sampling differs wherever its distribution does), so its proposal would cost more than it saves.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from reference.config import ModelConfig
from runtime.interface import KV_MODEL_FILE

from .floors import greedy_tokens
from .gate_drivers import KvLM, OrtLM, positions
from .gate_reference import Proposal, draw, gate_inputs, held_len, held_plan, heldout_text

PROPOSING_PRECISIONS = ("fp32", "fp16")


def propose(folder: Path, cfg: ModelConfig, providers: list[str], seed: int = 0) -> Proposal:
    """The artifact's greedy continuation of the gate's prompt and, when the held-out text is to be
    sampled, its sample with the same first tokens and noise (`held_plan`): all rows in one batch, one step at a time."""
    folder = Path(folder)
    prompt = gate_inputs(cfg.vocab_size, seed)[2]
    # lengths as the reference's (both fit beside the prompt in the context: no row outgrows it)
    n_greedy, n_held = greedy_tokens(cfg.max_position_embeddings), held_len(cfg.max_position_embeddings)
    sample = heldout_text(folder, cfg.vocab_size, length=n_held) is None
    first, noise = held_plan(cfg.vocab_size, n_held) if sample else (np.zeros(0, np.int64), None)
    rows = [prompt] + [[int(t)] for t in first]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    step = _Stepper(folder, cfg, providers, rows, max(n_greedy, n_held), pad)
    greedy, held = [], [list(r) for r in rows[1:]]
    last = step.last
    while len(greedy) < n_greedy or (held and len(held[0]) < n_held):
        nxt = last.argmax(-1)
        if held and len(held[0]) < n_held:
            nxt[1:] = draw(last[1:], noise[len(held[0]) - 1])
            for r, t in zip(held, nxt[1:]):
                r.append(int(t))
        if len(greedy) < n_greedy:
            greedy.append(int(nxt[0]))
        if len(greedy) < n_greedy or (held and len(held[0]) < n_held):
            last = step(nxt)
    del step  # the session's weights go before the reference loads
    return Proposal(greedy=greedy, held_ids=np.array(held, np.int64) if held else None)


class _Stepper:
    """Lock-step decoding of `rows` on the artifact: `.last` is each row's next-token logits [B, V];
    calling it with one token per row appends them. The shared-cache graph (right-padded rows)
    when the artifact has one, else model.onnx (left-padded rows)."""

    def __init__(self, folder: Path, cfg: ModelConfig, providers: list[str], rows: list[list[int]], new: int,
                 pad: int):
        L, H, hs = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size
        B, S = len(rows), max(len(r) for r in rows)
        ids = np.full((B, S), pad, np.int64)
        if (folder / KV_MODEL_FILE).is_file():
            for i, r in enumerate(rows):
                ids[i, : len(r)] = r
            self.kv = KvLM(folder, L, H, hs, providers, S + new, B)
            lens = [len(r) for r in rows]
            self.last = self.kv.prefill(ids, lens)[np.arange(B), np.array(lens) - 1]
        else:
            self.kv = None
            self.m = OrtLM(folder, L, H, hs, providers)
            self.mask = np.zeros((B, S), np.int64)
            for i, r in enumerate(rows):
                ids[i, S - len(r):], self.mask[i, S - len(r):] = r, 1
            logits, self.past = self.m(ids, self.mask, positions(self.mask))
            self.last = logits[:, -1]

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        if self.kv is not None:
            self.last = self.kv.step(tokens)[:, -1]
        else:
            self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
            logits, self.past = self.m(np.asarray(tokens)[:, None], self.mask, positions(self.mask)[:, -1:], self.past)
            self.last = logits[:, -1]
        return self.last
