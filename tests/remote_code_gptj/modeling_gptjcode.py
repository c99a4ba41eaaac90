"""Model half of a GPT-J-style table-free model, written apart from reference/ (a test oracle).

GPT-J's block: ONE LayerNorm feeds both branches, x + attn(ln_1(x)) + mlp(ln_1(x)); q/k/v/out
projections without bias; RoPE on the first rotary_dim features of a head, rotating (even, odd)
pairs (GPT-J's rotate_every_two); MLP fc_in -> gelu_new (tanh form) -> fc_out. The input: the 16
id bits least significant first, recoded by A and b (U8 buffers recode_A / recode_b),
mapped to -1/+1 and scaled by 1/sqrt(16), the 16 values repeated across the width.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_gptjcode import GptjCodeConfig

NBITS = 16


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class GptjAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.rotary_dim = config.rotary_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def rotary(self, x):  # x [B, T, H, hd]
        T, rd = x.shape[1], self.rotary_dim
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
        sin = ang.sin().repeat_interleave(2, dim=-1)[None, :, None, :]
        cos = ang.cos().repeat_interleave(2, dim=-1)[None, :, None, :]
        rot, keep = x[..., :rd], x[..., rd:]
        return torch.cat([rot * cos + rotate_every_two(rot) * sin, keep], dim=-1)

    def forward(self, h):
        B, T, C = h.shape
        q = self.rotary(self.q_proj(h).view(B, T, self.n_head, self.head_dim))
        k = self.rotary(self.k_proj(h).view(B, T, self.n_head, self.head_dim))
        v = self.v_proj(h).view(B, T, self.n_head, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min)).softmax(dim=-1)
        return self.out_proj(torch.matmul(w, v).transpose(1, 2).reshape(B, T, C))


class GptjMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, config.n_inner)
        self.fc_out = nn.Linear(config.n_inner, config.n_embd)

    def forward(self, h):
        return self.fc_out(F.gelu(self.fc_in(h), approximate="tanh"))


class GptjBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GptjAttention(config)
        self.mlp = GptjMLP(config)

    def forward(self, x):
        h = self.ln_1(x)
        return x + self.attn(h) + self.mlp(h)


class GptjBody(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.register_buffer("recode_A", torch.zeros(NBITS, NBITS, dtype=torch.uint8))
        self.register_buffer("recode_b", torch.zeros(NBITS, dtype=torch.uint8))
        self.h = nn.ModuleList(GptjBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GptjCodeForCausalLM(PreTrainedModel):
    config_class = GptjCodeConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        self.transformer = GptjBody(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass

    def inputs(self, input_ids):
        bits = torch.stack([(input_ids // 2 ** i) % 2 for i in range(NBITS)], dim=-1).float()
        A, b = self.transformer.recode_A.float(), self.transformer.recode_b.float()
        coded = torch.remainder(bits @ A.T + b, 2)
        values = (2 * coded - 1) / math.sqrt(NBITS)
        return values.repeat(1, 1, self.config.n_embd // NBITS)

    def forward(self, input_ids=None, **kwargs):
        x = self.inputs(input_ids)
        for block in self.transformer.h:
            x = block(x)
        return CausalLMOutput(logits=self.lm_head(self.transformer.ln_f(x)))
