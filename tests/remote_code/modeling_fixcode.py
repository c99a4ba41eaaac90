"""A stand-in for the seed checkpoint's own model code, written apart from reference/ (its oracle role).

Its conventions differ from the SPEC defaults on purpose, and are hard-coded as an author would:
the 16 id bits lsb first, recoded by A and b, mapped to +-1, each bit repeated
d/16 times in a row (interleave), LayerNorm, GELU tanh, RoPE on (even, odd) pairs.
Weight names follow nanoGPT (transformer.h.N.attn.c_attn with fused q|k|v).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_fixcode import FixCodeConfig


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    @staticmethod
    def rope(x, pos):
        hs = x.shape[-1]
        freq = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)
        ang = pos[:, None].float() * freq[None, :]          # [T, hs/2]
        c, s = ang.cos(), ang.sin()
        even, odd = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = even * c - odd * s
        out[..., 1::2] = odd * c + even * s
        return out

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        pos = torch.arange(T)
        q, k = self.rope(q, pos), self.rope(k, pos)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.affine_A = nn.Parameter(torch.zeros(16, 16, dtype=torch.uint8), requires_grad=False)
        self.affine_b = nn.Parameter(torch.zeros(16, dtype=torch.uint8), requires_grad=False)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)


class FixCodeForCausalLM(PreTrainedModel):
    config_class = FixCodeConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        self.transformer = Body(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass  # the test writes every weight itself

    def code(self, idx):
        bits = torch.stack([(idx >> i) & 1 for i in range(16)], dim=-1).long()      # lsb first
        A, b = self.transformer.affine_A.long(), self.transformer.affine_b.long()
        rec = (torch.einsum("kj,...j->...k", A, bits) + b) % 2
        vals = rec.float() * 2 - 1                                                   # +-1
        rep = self.config.n_embd // 16
        return vals.repeat_interleave(rep, dim=-1) * self.config.embedding_scale     # bit i on a run of rep

    def forward(self, input_ids=None, **kwargs):
        x = self.code(input_ids)
        for block in self.transformer.h:
            x = block(x)
        return CausalLMOutput(logits=self.lm_head(self.transformer.ln_f(x)))
