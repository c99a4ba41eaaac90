"""Model half of a GPT-NeoX-style table-free model, written apart from reference/ (a test oracle).

GPT-NeoX tensor names (per-head fused query_key_value, dense, dense_h_to_4h, embed_out), the
token's 16 bits taken most significant first, recoded over GF(2) by the U8 buffers code_A and
code_b, kept as 0/1 and laid side by side d/16 times (feature j holds bit j mod 16). RoPE rotates
the first rotary_pct of each head in two halves (NeoX's rotate_half) with base rotary_emb_base.
The block is GPT-NeoX's: parallel (x + attn(ln1(x)) + mlp(ln2(x))) or sequential pre-LN, plus a
post-LN variant no exporter option describes.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_neoxcode import NeoxCodeConfig

BITS = 16


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.rot = int(self.head_dim * config.rotary_pct)
        self.base = float(config.rotary_emb_base)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def rope(self, t):
        T = t.shape[-2]
        inv = 1.0 / self.base ** (torch.arange(0, self.rot, 2).float() / self.rot)
        freqs = torch.outer(torch.arange(T).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        r, keep = t[..., : self.rot], t[..., self.rot:]
        return torch.cat((r * emb.cos() + rotate_half(r) * emb.sin(), keep), dim=-1)

    def forward(self, hidden):
        B, T, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(B, T, self.heads, 3 * self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        q, k = self.rope(q), self.rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        probs = scores.masked_fill(~causal, torch.finfo(scores.dtype).min).softmax(-1)
        return self.dense((probs @ v).permute(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.post = config.post_layernorm
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x):
        if self.post:
            x = self.input_layernorm(x + self.attention(x))
            return self.post_attention_layernorm(x + self.mlp(x))
        if self.parallel:
            return x + self.attention(self.input_layernorm(x)) + self.mlp(self.post_attention_layernorm(x))
        x = x + self.attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.register_buffer("code_A", torch.zeros(BITS, BITS, dtype=torch.uint8))
        self.register_buffer("code_b", torch.zeros(BITS, dtype=torch.uint8))
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def embed(self, input_ids):
        shifts = torch.arange(BITS - 1, -1, -1)  # most significant bit first
        bits = (input_ids.unsqueeze(-1) >> shifts) & 1
        coded = (bits @ self.code_A.long().T + self.code_b.long()) % 2
        width = self.final_layer_norm.normalized_shape[0]
        return coded.float().repeat(1, 1, width // BITS)  # feature j = bit j mod 16


class NeoxCodeForCausalLM(PreTrainedModel):
    config_class = NeoxCodeConfig
    base_model_prefix = "gpt_neox"

    def __init__(self, config):
        super().__init__(config)
        self.gpt_neox = Trunk(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint

    def forward(self, input_ids=None, **kwargs):
        x = self.gpt_neox.embed(input_ids)
        for layer in self.gpt_neox.layers:
            x = layer(x)
        return CausalLMOutput(logits=self.embed_out(self.gpt_neox.final_layer_norm(x)))
