"""Config half of a GPT-J-style table-free model, written apart from reference/ (a test oracle).

As in GPT-J's own config class, `rotary_dim` is absolute and defaults here to half a head; a
config.json without it leaves the exporter's adapter blind to it.
"""
from transformers import PretrainedConfig


class GptjCodeConfig(PretrainedConfig):
    model_type = "gptj_code_test"

    def __init__(self, vocab_size=65536, n_embd=64, n_layer=2, n_head=2, n_inner=None, n_positions=128,
                 rotary_dim=None, layer_norm_epsilon=1e-5, **kwargs):
        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner if n_inner is not None else 4 * n_embd
        self.n_positions = n_positions
        self.rotary_dim = rotary_dim if rotary_dim is not None else n_embd // n_head // 2
        self.layer_norm_epsilon = layer_norm_epsilon
        super().__init__(**kwargs)
