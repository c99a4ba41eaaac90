"""A Llama-named table-free decoder with RoPE on the first half of each head, written apart from reference/.

As an author would hard-code it: the 16 id bits of the token (most significant first) recoded by
A and b over GF(2), as 0/1 floats, the 16-wide code laid end to end across the width; LayerNorm;
rotate-half RoPE on the first `partial_rotary_factor` of each head's features (the
rest pass through unrotated, as Phi and GPT-NeoX do); exact GELU. Llama tensor names
(model.layers.N.self_attn.q_proj, ...), no attention biases. It keeps a key/value cache, so
`generate()` decodes one token at a time, as a user of the checkpoint would run it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_halfrope import HalfRopeConfig


def rotate_first(x, pos, rot, theta):
    """x [B, H, T, hs]: rotate features [0, rot) pairing i with i + rot/2; features [rot, hs) untouched."""
    inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    ang = torch.outer(pos.float(), inv)                          # [T, rot/2]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    turned = torch.cat((-xr[..., half:], xr[..., :half]), -1)
    return torch.cat((xr * cos + turned * sin, xp), -1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.hs = d // self.heads
        self.rot = int(self.hs * config.partial_rotary_factor)
        self.theta = config.rope_theta
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x, start, cache):
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.hs).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        pos = torch.arange(start, start + T)
        q, k = rotate_first(q, pos, self.rot, self.theta), rotate_first(k, pos, self.rot, self.theta)
        if cache is not None:
            k, v = torch.cat((cache[0], k), 2), torch.cat((cache[1], v), 2)
        L = k.shape[2]
        future = torch.arange(L)[None, :] > (torch.arange(T)[:, None] + start)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.hs)
        att = att.masked_fill(future, float("-inf")).softmax(-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(B, T, d)), (k, v)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, start, cache):
        a, cache = self.self_attn(self.input_layernorm(x), start, cache)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.lift = nn.Module()
        self.lift.register_buffer("A", torch.zeros(16, 16, dtype=torch.uint8))
        self.lift.register_buffer("b", torch.zeros(16, dtype=torch.uint8))
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class HalfRopeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HalfRopeConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass  # the test writes every weight itself

    def code(self, ids):
        bits = torch.stack([(ids >> (15 - i)) & 1 for i in range(16)], -1).long()  # most significant first
        A, b = self.model.lift.A.long(), self.model.lift.b.long()
        rec = (bits @ A.T + b) % 2                                               # c~ = A c + b over GF(2)
        return rec.float().repeat(*([1] * ids.dim()), self.config.hidden_size // 16)  # c~ c~ c~ ... across d

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        if past_key_values is not None:  # the cache holds every token but the newest
            input_ids = input_ids[:, past_key_values[0][0].shape[2]:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": True}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, **kwargs):
        model_kwargs["past_key_values"] = outputs.past_key_values
        return model_kwargs

    def forward(self, input_ids=None, past_key_values=None, use_cache=False, **kwargs):
        start = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        x = self.code(input_ids)
        caches = []
        for i, layer in enumerate(self.model.layers):
            x, c = layer(x, start, None if past_key_values is None else past_key_values[i])
            caches.append(c)
        logits = self.lm_head(self.model.norm(x))
        return CausalLMOutputWithPast(logits=logits, past_key_values=tuple(caches) if use_cache else None)
