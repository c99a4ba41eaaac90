"""Config half of a GPT-NeoX-style table-free model, written apart from reference/ (a test oracle).

Like GPT-NeoX's own config class, the defaults are a parallel residual and RoPE on a quarter of
each head; a config.json that leaves those keys out gets them from here, where our exporter's
config adapter cannot see them: only running this code tells.
"""
from transformers import PretrainedConfig


class NeoxCodeConfig(PretrainedConfig):
    model_type = "neox_code_test"

    def __init__(self, vocab_size=65536, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25, rotary_emb_base=10000,
                 use_parallel_residual=True, layer_norm_eps=1e-5, post_layernorm=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_parallel_residual = use_parallel_residual
        self.layer_norm_eps = layer_norm_eps
        self.post_layernorm = post_layernorm  # a block the exporter does not describe: tests use it to be refused
        super().__init__(**kwargs)
