"""The artifact contract shared by the exporter (which writes it) and the runtime (which reads it).

It lives in `runtime` because the runtime depends on nothing else of the project; the exporter
imports these names from here, so each name, file name and the format version exist once.
"""
from __future__ import annotations

FORMAT_NAME = "tablefree-onnx-artifact"
FORMAT_VERSION = 1

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# optional second graph (graphs/gqa.py): the same weights (it reads DATA_FILE), but each layer's
# cache is one preallocated buffer that past and present share (com.microsoft.GroupQueryAttention),
# so a decode step writes one position instead of copying the cache (batches right-padded). SPEC 3
# stays in MODEL_FILE.
KV_MODEL_FILE = "model.kv.onnx"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
GENAI_CONFIG_FILE = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
# the lift's output inside both graphs (not a graph input): the traced body's first input
INPUTS_EMBEDS = "inputs_embeds"
LOGITS = "logits"
# optional input (default 0 = every position): logits only for the last N positions, so a prompt
# skips the vocabulary head on positions whose logits nobody reads (graphs/optimize.py)
LOGITS_TO_KEEP = "logits_to_keep"

# inputs of KV_MODEL_FILE instead of attention_mask / position_ids (GroupQueryAttention's own names)
SEQLENS_K = "seqlens_k"  # int32 [batch]: tokens in the cache after this step, minus 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: max over the batch of seqlens_k + 1

# symbolic dimension names of the graphs' inputs and outputs, as optimum names them (its io binding
# evaluates an output's names from the inputs' sizes, so no output carries a name no input defines)
BATCH_DIM = "batch_size"
SEQUENCE_DIM = "sequence_length"  # logits too: logits_to_keep=0 (the default) keeps every position
PAST_SEQUENCE_DIM = "past_sequence_length"
TOTAL_SEQUENCE_DIM = "past_sequence_length + sequence_length"  # attention_mask and present.*

PAST_KEY = "past_key_values.{i}.key"
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"
PRESENT_VALUE = "present.{i}.value"

LIFT_MODES = ("bitwise", "arith", "lookup")
PRECISIONS = ("fp32", "fp16", "int8", "int4")


def past_names(num_layers: int) -> list[str]:
    """past_key_values.{i}.key / .value for every layer, in graph input order."""
    out: list[str] = []
    for i in range(num_layers):
        out += [PAST_KEY.format(i=i), PAST_VALUE.format(i=i)]
    return out


def present_names(num_layers: int) -> list[str]:
    """present.{i}.key / .value for every layer, in graph output order."""
    out: list[str] = []
    for i in range(num_layers):
        out += [PRESENT_KEY.format(i=i), PRESENT_VALUE.format(i=i)]
    return out


def input_names(num_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]


def kv_input_names(num_layers: int) -> list[str]:
    """Inputs of KV_MODEL_FILE (LOGITS_TO_KEEP is optional there too); outputs are output_names."""
    return [INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *past_names(num_layers)]
