"""What the artifact folder (SPEC 3) holds besides the graphs: configs, tokenizer, the manifest's fields.

The contents are decided here; the writing (atomic files, sha256 table, the move into place) is
export/writer.py's `ArtifactWriter`, which every function below writes through.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from reference.config import ModelConfig
from runtime.artifact import sha256_file
from runtime.interface import (ATTENTION_MASK, CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, GENAI_CONFIG_FILE,
                               GENERATION_CONFIG_FILE, INPUT_IDS, LOGITS, MODEL_FILE, PAST_KEY, PAST_VALUE,
                               POSITION_IDS, PRESENT_KEY, PRESENT_VALUE, TOKENIZER_FILES)

from .errors import ExportError
from .writer import ArtifactWriter

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# what a tokenizer returns for the graphs (transformers/optimum feed exactly these): never
# token_type_ids, which PreTrainedTokenizerFast adds by default and no graph input takes
MODEL_INPUT_NAMES = [INPUT_IDS, ATTENTION_MASK]


def write_config(w: ArtifactWriter, cfg: ModelConfig) -> None:
    """config.json with the lift conventions and A/b spelled out: the artifact needs no weights file to describe its code."""
    w.write_json(CONFIG_FILE, cfg.to_dict(with_matrix=True))


def write_generation_config(w: ArtifactWriter, cfg: ModelConfig, source: Path) -> None:
    src = source / GENERATION_CONFIG_FILE
    gen: dict[str, Any] = json.loads(src.read_text()) if src.is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        gen.setdefault(key, getattr(cfg, key))
    gen.setdefault("max_length", cfg.max_position_embeddings)
    w.write_json(GENERATION_CONFIG_FILE, gen)


def genai_readable_tokenizer(path: Path | bytes, vocab_size: int) -> bytes:
    """tokenizer.json (a file or its bytes) in the form onnxruntime-genai reads as code points
    (export/tokenizer_files.py), which `tokenizers` encodes exactly as the original; other kinds of
    tokenizer come back as they are."""
    from .tokenizer_files import TokenizerFormError, genai_tokenizer_json

    raw = path if isinstance(path, bytes) else path.read_bytes()
    try:
        return json.dumps(genai_tokenizer_json(json.loads(raw), vocab_size), ensure_ascii=False).encode("utf-8")
    except TokenizerFormError:
        return raw


def _chat_template_file(source: Path, root: Path) -> str | None:
    """chat_template.jinja (transformers >= 4.47 saves the template there) or chat_template.json,
    inside the checkpoint folder; the artifact keeps it in tokenizer_config.json, where the server
    and the other front ends look."""
    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            real = (source / name).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if not real.is_file() or not real.is_relative_to(root):
            continue
        try:
            text = real.read_text(encoding="utf-8")
            value = json.loads(text).get("chat_template") if name.endswith(".json") else text
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ExportError(f"{source / name} is not a readable chat template ({type(e).__name__}: {e}); "
                              "fix or remove it and export again") from None
        return value if isinstance(value, (str, list)) else None
    return None


def check_tokenizer_files(source: Path) -> None:
    """Read what copy_tokenizer will read (tokenizer_config.json, a chat template file), so a broken
    one is refused before the long stages, not after them."""
    root = source.resolve()
    path = source / TOKENIZER_CONFIG_FILE
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        real = None
    if real is not None and real.is_file() and real.is_relative_to(root):
        try:
            tc = json.loads(real.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"{path} is not valid JSON ({e}); fix or remove it and export again") from None
        if not isinstance(tc, dict):
            raise ExportError(f"{path} must hold a JSON object; fix or remove it and export again")
    _chat_template_file(source, root)


def copy_tokenizer(w: ArtifactWriter, source: Path, vocab_size: int | None = None, remote=None) -> list[str]:
    """The checkpoint's tokenizer files, each only if it resolves inside the checkpoint folder;
    tokenizer_config.json gains `model_input_names` (written even when the checkpoint had none);
    with `vocab_size`, tokenizer.json is shipped in the form genai reads too (genai_readable_tokenizer).

    `remote` (export/remote_tokenizer.RemoteTokenizer): the folder's tokenizer is code; its checked
    conversion is the tokenizer.json, or there is none (the artifact runs on ids, even when the
    folder has a tokenizer.json: it does not do what the code does). A tokenizer_config.json that
    names tokenizer code loses it (the artifact holds no code): see remote_tokenizer.shipped_config."""
    from .remote_tokenizer import shipped_config, tokenizer_code

    copied = []
    root = source.resolve()
    if remote is not None and remote.tokenizer_json is not None:
        raw = remote.tokenizer_json.encode("utf-8")
        w.write_bytes(TOKENIZER_FILES[0], genai_readable_tokenizer(raw, vocab_size) if vocab_size is not None else raw)
        copied.append(TOKENIZER_FILES[0])
    strip_code = tokenizer_code(source) is not None
    for name in TOKENIZER_FILES:
        if remote is not None and name == TOKENIZER_FILES[0]:
            continue
        src = source / name
        try:
            real = src.resolve(strict=True)
        except (OSError, RuntimeError):  # absent, or a symlink loop
            continue
        if not real.is_file() or not real.is_relative_to(root):
            continue
        if name == TOKENIZER_CONFIG_FILE:
            tc = json.loads(real.read_text())
            template = _chat_template_file(source, root)
            if template is not None and "chat_template" not in tc:  # newer transformers keep it beside
                tc["chat_template"] = template
            w.write_json(name, {**(shipped_config(tc) if strip_code else tc), "model_input_names": MODEL_INPUT_NAMES})
        elif name == "tokenizer.json" and vocab_size is not None:
            w.write_bytes(name, genai_readable_tokenizer(real, vocab_size))
        else:
            w.copy_file(name, real)
        copied.append(name)
    if copied and TOKENIZER_CONFIG_FILE not in copied:
        w.write_json(TOKENIZER_CONFIG_FILE, {"tokenizer_class": "PreTrainedTokenizerFast",
                                             "model_input_names": MODEL_INPUT_NAMES})
        copied.append(TOKENIZER_CONFIG_FILE)
    return copied


def _pattern(template: str) -> str:
    return template.replace("{i}", "%d")


def write_genai_config(w: ArtifactWriter, cfg: ModelConfig, provider: str, shared_buffer: bool = False) -> None:
    """onnxruntime-genai's layout, so its `og.Model(folder)` can load the artifact as a plain decoder:
    over model.genai.onnx with one shared cache buffer per layer when the artifact has it (genai's usual
    setup, graphs/genai_kv.py), else over model.onnx."""
    provider_options = [{"cuda": {}}] if provider == "cuda" else []
    genai = {
        "model": {
            "bos_token_id": cfg.bos_token_id,
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": MODEL_FILE,
                "head_size": cfg.head_size,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": _pattern(PAST_KEY),
                    "past_value_names": _pattern(PAST_VALUE),
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": _pattern(PRESENT_KEY),
                    "present_value_names": _pattern(PRESENT_VALUE),
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_attention_heads,
            },
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
            "type": "decoder",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": cfg.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    if shared_buffer:
        from graphs.genai_kv import genai_kv_config

        genai = genai_kv_config(genai, cfg.num_attention_heads)
    w.write_json(GENAI_CONFIG_FILE, genai)


def source_hashes(source: Path) -> dict[str, dict[str, Any]]:
    """sha256 of the checkpoint's files (weights, configs, tokenizer), so an artifact names its exact input."""
    out = {}
    for p in sorted(source.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".txt", ".model") or p.name in TOKENIZER_FILES):
            out[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def producer_versions() -> dict[str, str]:
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript
    import torch

    from . import __version__

    return {"tablefree-onnx": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnx_ir": onnx_ir.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def write_manifest(w: ArtifactWriter, *, cfg: ModelConfig, source_info: dict, source: Path, lift_mode: str,
                   precision: str, opset: int, providers_verified: list[str], parity: dict | None,
                   stages: dict[str, float], kv_graph: dict | None = None, quantization: dict | None = None,
                   tokenizer: dict | None = None) -> dict:
    """manifest.json (SPEC 3): where the artifact came from, how it was made, the gate's report;
    the writer adds the sha256 table of every file."""
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "producer": producer_versions(),
        "source": {**source_info, "files": source_hashes(source)},
        "lift": {"mode": lift_mode, **cfg.code.to_dict(with_matrix=True)} if lift_mode != "table" else {
            "mode": lift_mode, "table": [cfg.vocab_size, cfg.hidden_size],
            "no_vocab_table": "waived: a learned-input-table model, exported to compare with its table-free twin"},
        "precision": precision,
        "opset": opset,
        "kv_graph": kv_graph or {"file": None},
        "providers_verified": providers_verified,
        "parity": parity,
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
    }
    if tokenizer is not None:  # the checkpoint's tokenizer is code (export/remote_tokenizer.py): converted, or ids only
        manifest["tokenizer"] = tokenizer
    if quantization is not None:  # how int8 / int4 weights were made (export.build.convert_precision)
        manifest["quantization"] = quantization
    return w.write_manifest(manifest)
