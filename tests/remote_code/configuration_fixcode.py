"""A stand-in for the seed checkpoint's own remote code (config half), written apart from reference/.

The real checkpoint ships `model_type: model_binary_affine_code_n_layer_32` with custom code whose
conventions are unpublished; this folder plays that role in tests/test_remote_code.py.
"""
from transformers import PretrainedConfig


class FixCodeConfig(PretrainedConfig):
    model_type = "model_binary_affine_code_test"

    def __init__(self, vocab_size=65536, n_embd=64, n_layer=2, n_head=4, block_size=128,
                 embedding_scale=1.0, **kwargs):
        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.block_size = block_size
        self.embedding_scale = embedding_scale  # not a SPEC convention: tests use it to break the match
        super().__init__(**kwargs)
