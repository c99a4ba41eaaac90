"""A Llama-named decoder with rotary on half of each head (config half), written apart from reference/.

It plays a partial-rotary checkpoint in tests/test_remote_code_partial_rotary.py: config.json says
`partial_rotary_factor` as Phi does; the code's bit order (most significant first) is in the code only.
"""
from transformers import PretrainedConfig


class HalfRopeConfig(PretrainedConfig):
    model_type = "half_rope_code_test"

    def __init__(self, vocab_size=65536, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=128, partial_rotary_factor=0.5,
                 rope_theta=10000.0, layer_norm_eps=1e-5, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_theta = rope_theta
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)
