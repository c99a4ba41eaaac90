"""Quality floors per precision: the one place the build's bounds for SPEC 5 live.

A build measures, against the float32 PyTorch reference on held-out text:
  top1  - fraction of positions whose argmax token agrees (higher is better),
  kl    - mean KL(reference || artifact) per position, in nats (lower is better),
  ppl_ratio - artifact perplexity / reference perplexity (lower is better, 1.0 is equal).

How they were set (4 x 64 held-out positions per build, arith mode, onnxruntime 1.32 CPU; the
int8 and int4 settings are those of export/build.py: 8-bit MatMulNBits block 128; 4-bit
round-to-nearest block 32 asymmetric with an 8-bit head (`--quantizer rtn`, the int4 default until
GPTQ), and GPTQ block 256 symmetric with a 4-bit head (the default now); accuracy level 4):

  model                                  precision        top1   kl       ppl_ratio
  demo, trained (models/shakespeare)     fp16             1.000  5.9e-07  1.000
  demo, trained                          int8             0.956  1.5e-03  1.00
  demo, trained                          int4 rtn         0.829  5.3e-02  1.06
  demo, trained (sampled held-out text)  int4 gptq        0.786  6.8e-02  1.09
  full size 0.47B, random weights        int8             0.976  2.4e-03  1.010
  full size 0.47B, random weights        int4 rtn         0.758  1.8e-01  1.149
  full size 0.47B, random weights        int4 gptq        0.873  6.2e-02  1.103
  tiny test model, random weights        fp16             1.000  4.7e-07  1.000

The int4 floors were set on round-to-nearest and are kept: GPTQ is well inside them, and
`--quantizer rtn` must still pass (benchmarks/RESULTS.md, "Calibrated int4").

Each floor sits below the worst of these with a margin, so run-to-run and CPU-kernel differences
cannot flip a build, yet a broken conversion (a wrong scale, a dropped zero point, signed int8 on a
CPU without VNNI) fails it. Random weights have near-tied logits, so they are the pessimistic case
that sets the int4 floors; the trained model is far inside them.
"""
from __future__ import annotations

FLOORS: dict[str, dict[str, float]] = {
    # fp32 is held to the exact parity bounds of SPEC 5; these only catch gross breakage.
    "fp32": {"top1": 0.999, "kl": 1e-6, "ppl_ratio": 1.0001},
    "fp16": {"top1": 0.99, "kl": 1e-4, "ppl_ratio": 1.01},
    "int8": {"top1": 0.93, "kl": 6e-3, "ppl_ratio": 1.03},
    "int4": {"top1": 0.70, "kl": 2.5e-1, "ppl_ratio": 1.20},
}

# SPEC 5: fp32 logits must agree within this fraction of the largest |logit|.
FP32_REL_TOL = 1e-4
# SPEC 5: greedy generation must be token-exact for at least this many new tokens (fp32).
GREEDY_TOKENS = 64
PROMPT_TOKENS = 8  # the greedy check's prompt (gate_reference.gate_inputs)
# The shortest context the gate checks: the padded-row checks need 9 + 16 positions, and an 8-token
# prompt leaves 24 greedy tokens and 24 held-out positions a row, the least that still says much.
MIN_GATE_CONTEXT = 32


def greedy_tokens(context: int) -> int:
    """New tokens the greedy checks decode: SPEC 5's GREEDY_TOKENS, or all that fit after the prompt
    in a shorter context (a position past it has no rotary angle in the graph: ORT refuses it)."""
    return min(GREEDY_TOKENS, context - PROMPT_TOKENS)


def context_too_short(context: int) -> str | None:
    """Why the gate cannot check a model of this context length, or None when it can."""
    if context >= MIN_GATE_CONTEXT:
        return None
    return (f"max_position_embeddings = {context} is below {MIN_GATE_CONTEXT}, the shortest context the parity gate "
            f"checks (a prompt of {PROMPT_TOKENS} tokens, then {MIN_GATE_CONTEXT - PROMPT_TOKENS} greedy tokens and "
            f"held-out positions); pass --no-verify to export it unchecked (the manifest says so), or export a "
            f"checkpoint with max_position_embeddings >= {MIN_GATE_CONTEXT}")


def floors_for(precision: str) -> dict[str, float]:
    return dict(FLOORS[precision])
