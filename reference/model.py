"""The table-free decoder (SPEC 1.2) in plain PyTorch, readable in one sitting.

The input vector of token t is `lift(t)`, not a row of a table (`input_table` is the paper's
learned-table baseline, kept for comparison). Everything after it is a pre-norm GPT block with
rotary positions; the published decoder variants are config fields: a parallel residual with one
norm (GPT-J) or two (GPT-NeoX), and RoPE on the first `rotary_dim` features of a head only. The KV cache is explicit: `forward` takes the past
keys/values per layer and returns the present ones, so one function serves prefill and decode,
exactly like the exported graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .lift import lift

KV = tuple[torch.Tensor, torch.Tensor]


class Norm(nn.Module):
    """LayerNorm or RMSNorm, bias optional (detected from the checkpoint's weights)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps = cfg.norm_type, cfg.layer_norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.norm_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return y if self.bias is None else y + self.bias


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles from position ids: [B, S] -> cos, sin of shape [B, 1, S, rotary_dim/2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate pairs of x [B, H, S, hs]: (i, i + r/2) for rotate_half, (2i, 2i+1) for interleaved, over the
    first r = 2 * cos.shape[-1] features; the rest pass through (partial rotary, as GPT-NeoX / GPT-J)."""
    r = 2 * cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin, pairing), x[..., r:]), dim=-1)
    if pairing == "rotate_half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.heads, self.head_size, self.pairing = cfg.num_attention_heads, cfg.head_size, cfg.rope_pairing
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past: KV | None) -> tuple[torch.Tensor, KV]:
        B, S, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, S, self.heads, self.head_size).transpose(1, 2)

        q = apply_rope(split(self.q_proj(x)), cos, sin, self.pairing)
        k = apply_rope(split(self.k_proj(x)), cos, sin, self.pairing)
        v = split(self.v_proj(x))
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_size)) + bias
        y = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class Block(nn.Module):
    """Sequential pre-LN (the seed), or parallel: both branches read the block input x."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln1, self.attn = Norm(cfg), Attention(cfg)
        self.ln2 = Norm(cfg) if cfg.has_ln2 else None
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, bias, past: KV | None) -> tuple[torch.Tensor, KV]:
        n1 = self.ln1(x)
        a, present = self.attn(n1, cos, sin, bias, past)
        if self.parallel:
            return x + a + self.mlp(n1 if self.ln2 is None else self.ln2(x)), present
        h = x + a
        return h + self.mlp(self.ln2(h)), present


class Code(nn.Module):
    """Holds A and b as uint8 buffers so they travel in the state dict as code.A / code.b."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.code
        self.register_buffer("A", torch.as_tensor(cfg.code.A, dtype=torch.uint8).clone())
        self.register_buffer("b", torch.as_tensor(cfg.code.b, dtype=torch.uint8).clone())

    def forward(self, ids: torch.Tensor, width: int) -> torch.Tensor:
        return lift(ids, self.cfg, width, self.A, self.b)


def attention_bias(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, P+S] 0/1 mask and [B, S] positions -> additive [B, 1, S, P+S] bias: causal and padding in one tensor.

    Masked entries get the dtype's minimum, not -inf, so a fully padded row stays finite.
    The slot indices are counted from the two tensors (a cumulative sum of ones), never taken from
    a size with arange: the exported graph then computes no shape at run time, which ONNX Runtime's
    CUDA provider would place on the CPU (a refused session once CPU fallback is disabled).
    Query i of S sits at slot (P+S) - S + i, key j at slot j; position_ids only lends its shape.
    """
    ones_k = attention_mask.long() * 0 + 1
    ones_q = position_ids.long() * 0 + 1
    k_pos = ones_k.cumsum(-1) - 1                                                   # [B, T]: 0 .. T-1
    past = ones_k.sum(-1, keepdim=True) - ones_q.sum(-1, keepdim=True)              # [B, 1]: T - S
    q_pos = ones_q.cumsum(-1) - 1 + past                                            # [B, S]: T-S .. T-1
    allowed = (k_pos.unsqueeze(1) <= q_pos.unsqueeze(-1)) & attention_mask.bool().unsqueeze(1)
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.where(allowed, zero, neg).unsqueeze(1)


def default_position_ids(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions count only attended tokens, so a left-padded row matches the same row alone."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -seq_len:]


class TableFreeLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.code = Code(cfg)
        if cfg.input_table:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = Norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.input_table:
            return self.embed_tokens(input_ids)
        return self.code(input_ids, self.cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: list[KV] | None = None,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Logits [B, S, V] and the present cache (one (k, v) per layer, [B, H, P+S, hs])."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = x.shape
        P = 0 if not past_key_values else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, P + S, dtype=torch.int64, device=x.device)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, S)
        cos, sin = rope_cos_sin(position_ids, self.cfg.rope_dim, self.cfg.rope_theta)
        bias = attention_bias(attention_mask, position_ids)
        presents: list[KV] = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, cos, sin, bias, past_key_values[i] if past_key_values else None)
            presents.append(present)
        return self.lm_head(self.ln_f(x)), presents
