"""Trace the reference model into an ONNX body graph with the dynamo exporter.

The body takes `inputs_embeds` (the lift is spliced in front of it afterwards, in `graphs/`), the
mask, the positions and the flat past cache, and returns logits and the flat present cache under
the SPEC 3 names. Linear weights are handed to the tracer already transposed (a view, no copy), so
the graph holds `x @ W^T` as a plain MatMul on a stored [in, out] weight: no Transpose to fold, and
no second copy of every weight while folding it - which is what makes the 0.5B export fit in memory.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn

from reference.model import TableFreeLM
from runtime.interface import ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, POSITION_IDS, past_names, present_names

DEFAULT_OPSET = 21  # loads in onnxruntime >= 1.17; LayerNormalization is in the default domain
# the vocabulary head is traced as column blocks of at most this many bytes (see SplitHead)
HEAD_CHUNK_BYTES = 32 * 2**20


class MatMulLinear(nn.Module):
    """`y = x @ Wt + b` with `Wt` a transposed view of the original Linear weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class SplitHead(nn.Module):
    """The vocabulary head as `parts` MatMuls over column blocks of W^T, concatenated.

    Why: ONNX Runtime prepacks each MatMul weight at session load and holds the packed and the
    original copy of a tensor at once while it does; for the 0.5B model's 268 MB head that is the
    whole of the load's peak above the weights (HWM 2.16 GB vs 1.90 GB after load, measured;
    benchmarks/RESULTS.md). Blocks of <= 32 MB make that transient 8x smaller. Each logit is the
    same dot product as before; the parity gate checks it.
    """

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        weight_t = linear.weight.detach().t()
        self.blocks = nn.ParameterList(nn.Parameter(b.contiguous(), requires_grad=False)
                                       for b in weight_t.tensor_split(parts, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.matmul(x, b) for b in self.blocks], dim=-1)


def head_parts(linear: nn.Linear) -> int:
    return max(1, -(-linear.weight.numel() * linear.weight.element_size() // HEAD_CHUNK_BYTES))


@contextlib.contextmanager
def matmul_linears(lm: nn.Module) -> Iterator[None]:
    """Swap every nn.Linear for MatMulLinear (the head for SplitHead when it is large) during tracing;
    the module path stays the same."""
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    for _, parent in list(lm.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                swapped.append((parent, name, child))
                parts = head_parts(child) if child is getattr(lm, "lm_head", None) and child.bias is None else 1
                setattr(parent, name, SplitHead(child, parts) if parts > 1 else MatMulLinear(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class KVWrapper(nn.Module):
    """The reference with a flat cache: (embeds, mask, positions, k0, v0, k1, ...) -> (logits, k0', ...)."""

    def __init__(self, model: TableFreeLM):
        super().__init__()
        self.model = model
        self.num_layers = model.cfg.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        pkv = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        logits, presents = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=pkv)
        out = [logits]
        for k, v in presents:
            out += [k, v]
        return tuple(out)


def example_inputs(lm: TableFreeLM, batch: int = 2, seq: int = 3, past: int = 5) -> tuple:
    """Sizes other than 0 and 1 so the tracer cannot specialise any dynamic axis."""
    cfg = lm.cfg
    dev = next(lm.parameters()).device
    L, H, hs = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size
    embeds = torch.zeros(batch, seq, cfg.hidden_size, device=dev)
    mask = torch.ones(batch, past + seq, dtype=torch.int64, device=dev)
    pos = torch.arange(past, past + seq, device=dev).expand(batch, seq).clone()
    cache = tuple(torch.zeros(batch, H, past, hs, device=dev) for _ in range(2 * L))
    return embeds, mask, pos, cache


def trace_body(lm: TableFreeLM, opset: int = DEFAULT_OPSET):
    """Export the body graph; returns an onnx_ir.Model whose weights still point at torch memory."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # torchvision-missing notes are noise here
    L = lm.cfg.num_hidden_layers
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past} for _ in range(2 * L)),
    )
    lm.eval()
    with matmul_linears(lm), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = KVWrapper(lm).eval()
        program = torch.onnx.export(
            wrapper,
            example_inputs(lm),
            dynamo=True,
            input_names=[INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, *past_names(L)],
            output_names=[LOGITS, *present_names(L)],
            dynamic_shapes=dynamic,
            opset_version=opset,
            optimize=False,
            verbose=False,
            report=False,
        )
    return program.model
