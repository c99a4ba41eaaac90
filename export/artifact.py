"""The artifact folder (SPEC 3): everything but the graph, and the atomic move into place.

A build writes into a temporary sibling of `--out` and renames it into place only when the
parity gate passed, so a reader never sees a half-written folder and a failed build never
replaces a good one.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from reference.config import ModelConfig
from runtime.interface import (ATTENTION_MASK, CONFIG_FILE, DATA_FILE, FORMAT_NAME, FORMAT_VERSION,
                               GENAI_CONFIG_FILE, GENERATION_CONFIG_FILE, INPUT_IDS, LOGITS, MANIFEST_FILE,
                               MODEL_FILE, PAST_KEY, PAST_VALUE, POSITION_IDS, PRESENT_KEY, PRESENT_VALUE,
                               TOKENIZER_FILES)


# The runtime checks these hashes; one function computes them on both sides.
from runtime.artifact import sha256_file as sha256  # noqa: E402


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def file_hashes(folder: Path, skip: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, dict[str, Any]]:
    return {p.name: {"sha256": sha256(p), "size": p.stat().st_size}
            for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name not in skip}


def write_config(folder: Path, cfg: ModelConfig) -> None:
    """config.json with the lift conventions and A/b spelled out: the artifact needs no weights file to describe its code."""
    write_json(folder / CONFIG_FILE, cfg.to_dict(with_matrix=True))


def write_generation_config(folder: Path, cfg: ModelConfig, source: Path) -> None:
    src = source / GENERATION_CONFIG_FILE
    gen: dict[str, Any] = json.loads(src.read_text()) if src.is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        gen.setdefault(key, getattr(cfg, key))
    gen.setdefault("max_length", cfg.max_position_embeddings)
    write_json(folder / GENERATION_CONFIG_FILE, gen)


def copy_tokenizer(folder: Path, source: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    return copied


def _pattern(template: str) -> str:
    return template.replace("{i}", "%d")


def write_genai_config(folder: Path, cfg: ModelConfig, provider: str) -> None:
    """onnxruntime-genai's layout, so its `og.Model(folder)` can load the artifact as a plain decoder."""
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
    write_json(folder / GENAI_CONFIG_FILE, genai)


def source_hashes(source: Path) -> dict[str, dict[str, Any]]:
    """sha256 of the checkpoint's files (weights, configs, tokenizer), so an artifact names its exact input."""
    out = {}
    for p in sorted(source.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".txt", ".model") or p.name in TOKENIZER_FILES):
            out[p.name] = {"sha256": sha256(p), "size": p.stat().st_size}
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


def write_manifest(folder: Path, *, cfg: ModelConfig, source_info: dict, source: Path, mode: str,
                   precision: str, opset: int, providers_verified: list[str], parity: dict | None,
                   stages: dict[str, float], kv_graph: dict | None = None) -> dict:
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "producer": producer_versions(),
        "source": {**source_info, "files": source_hashes(source)},
        "lift": {"mode": mode, **cfg.code.to_dict(with_matrix=True)} if mode != "table" else {
            "mode": mode, "table": [cfg.vocab_size, cfg.hidden_size],
            "no_vocab_table": "waived: a learned-input-table model, exported to compare with its table-free twin"},
        "precision": precision,
        "opset": opset,
        "kv_graph": kv_graph or {"file": None},
        "providers_verified": providers_verified,
        "parity": parity,
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "files": file_hashes(folder),
    }
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def move_into_place(staging: Path, out: Path) -> None:
    """Replace `out` by `staging` with renames only: the old artifact stays whole until the new one is in."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def keep_failed(staging: Path, out: Path) -> Path:
    """Park a failed build as `<out>.failed` (replacing an older failure) so its report can be read."""
    failed = out.with_name(out.name + ".failed")
    if failed.exists():
        shutil.rmtree(failed, ignore_errors=True)
    os.replace(staging, failed)
    return failed


def required_files() -> tuple[str, ...]:
    return (MODEL_FILE, DATA_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, GENAI_CONFIG_FILE)
