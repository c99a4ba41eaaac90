"""`import runtime.hf` makes the artifact's `model_type: "tablefree"` known to transformers, so that
Hugging Face optimum loads the folder as it is shipped:

    import runtime.hf  # noqa: F401  (registers the config; needs transformers)
    from optimum.onnxruntime import ORTModelForCausalLM
    model = ORTModelForCausalLM.from_pretrained(folder, file_name="model.onnx")
    pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(folder))

Why only a config: optimum's ORTModelForCausalLM runs the ONNX graph itself and asks transformers
only for the config (AutoConfig), which refuses an unknown model type. From the config it reads
`hidden_size // num_attention_heads` (head size of the empty cache it feeds on the first step),
`num_attention_heads` (the cache's head count for model types outside its list of GQA families;
ours has as many KV heads as query heads), `use_cache` (whether to feed and read the cache) and
the token ids generation stops and pads on. The graph's own names (input_ids, attention_mask,
position_ids, past_key_values.{i}.key/.value -> logits, present.{i}.key/.value) are the ones it
looks for. With `use_io_binding=True` it sizes every output from the graph's dimension names, so
those must be its own (`batch_size`, `sequence_length`, `past_sequence_length`,
`past_sequence_length + sequence_length`) with no output-only name.

transformers is imported here and only here: the rest of `runtime` never needs it.
"""
from __future__ import annotations

from typing import Any

try:
    from transformers import AutoConfig, PretrainedConfig
except ImportError as e:  # one readable line instead of a traceback into transformers
    raise ImportError("runtime.hf needs transformers (optimum-onnx 0.1 wants transformers<4.58): "
                      "pip install 'optimum-onnx[onnxruntime]'") from e

MODEL_TYPE = "tablefree"


class TablefreeConfig(PretrainedConfig):
    """The artifact's config.json as transformers sees it; unknown keys (code, training, ...) are kept as attributes."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 65536, hidden_size: int = 128, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, intermediate_size: int | None = None,
                 max_position_embeddings: int = 256, use_cache: bool = True, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # no grouped-query attention in this family: every head has its own keys and values
        self.num_key_value_heads = kwargs.pop("num_key_value_heads", num_attention_heads)
        self.head_dim = kwargs.pop("head_dim", hidden_size // num_attention_heads)
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


def register() -> type[PretrainedConfig]:
    """Register TablefreeConfig with AutoConfig (done on import; calling it again is harmless)."""
    try:
        AutoConfig.register(MODEL_TYPE, TablefreeConfig)
    except ValueError:  # already registered, by this module or an earlier import of it
        pass
    return TablefreeConfig


register()

__all__ = ["TablefreeConfig", "register", "MODEL_TYPE"]
