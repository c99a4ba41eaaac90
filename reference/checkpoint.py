"""Checkpoint folders (SPEC 2): read and write Hugging Face style safetensors folders.

Reading is layered so that every refusal comes before the first weight byte is read:
1. the folder's own files: config.json (UTF-8 JSON object, every field of the right type and range),
   generation_config.json if present, tokenizer files (inside the folder, no loops), all checked by
   `check_folder`;
2. every safetensors header in full (reference/safetensors_io.py);
3. stored names -> canonical names, shapes and dtypes against the config (reference/adapter.py);
4. the code A and b (tiny), then the weights one tensor at a time, each refused if it holds NaN/Inf.
Every refusal is one `CheckpointError` line naming the file, the field or tensor, and the fix.

Pickle files (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) are never opened: unpickling runs code.
No file of the folder is ever imported or executed here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.interface import CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILES

from .adapter import KeyMap, canonical_shapes, check_mapped, detect_biases, map_tensors, read_key_map, split_fused
from .config import ConfigError, ModelConfig, check_int, check_real
from .safetensors_io import (
    DTYPE_NAMES,
    CheckpointError,
    TensorInfo,
    atomic_write_text,
    inside_folder,
    read_header,
    read_json_object,
    read_tensor,
    weight_files,
    write_weights,
)

# Files a folder may hold that the exporter reads or copies into the artifact: checked like weights.
TOKENIZER_EXTRA = ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def read_config(folder: Path) -> tuple[dict[str, Any], ModelConfig]:
    """config.json as raw dict and as a ModelConfig whose types and ranges are checked (validate())."""
    path = folder / CONFIG_FILE
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs config.json (Hugging Face layout)")
    raw = read_json_object(inside_folder(folder, path), "a checkpoint folder needs config.json")
    try:
        cfg = ModelConfig.from_dict(raw)
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: cannot read it as a model config ({str(e)[:150]}); fix config.json") from None
    return raw, cfg


def check_generation_config(folder: Path, cfg: ModelConfig) -> None:
    """generation_config.json, if present: an object whose known fields have sane types and ranges."""
    path = folder / GENERATION_CONFIG_FILE
    if not os.path.lexists(path):
        return
    gen = read_json_object(inside_folder(folder, path), f"put {GENERATION_CONFIG_FILE} back or remove it")
    try:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = gen.get(key)
            for tid in value if isinstance(value, list) and key == "eos_token_id" else [value]:
                if tid is not None:
                    check_int(key, tid, 0, cfg.vocab_size - 1)
        for key in ("max_length", "max_new_tokens"):
            if gen.get(key) is not None:
                check_int(key, gen[key])
        if gen.get("top_k") is not None:
            check_int("top_k", gen["top_k"], 0)
        if gen.get("temperature") is not None:
            check_real("temperature", gen["temperature"], positive=False, nonzero=False)
            if gen["temperature"] < 0:
                raise ConfigError(f"temperature = {gen['temperature']} must be >= 0; fix config.json")
        if gen.get("top_p") is not None:
            check_real("top_p", gen["top_p"])
            if gen["top_p"] > 1:
                raise ConfigError(f"top_p = {gen['top_p']} must be in (0, 1]; fix config.json")
        if "do_sample" in gen and not isinstance(gen["do_sample"], bool):
            raise ConfigError(f"do_sample = {gen['do_sample']!r} must be true or false; fix config.json")
    except ConfigError as e:  # the shared checks say config.json: this file is the generation config
        raise CheckpointError(f"{path}: {str(e).replace('config.json', GENERATION_CONFIG_FILE)}") from None


def check_folder(folder: Path) -> tuple[dict[str, Any], ModelConfig]:
    """Everything but the weights: config.json, generation_config.json, tokenizer files (SPEC 6)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist; pass the folder that holds config.json and model.safetensors")
    raw, cfg = read_config(folder)
    check_generation_config(folder, cfg)
    for name in TOKENIZER_FILES + TOKENIZER_EXTRA:  # the exporter copies these into the artifact
        if os.path.lexists(folder / name):
            inside_folder(folder, folder / name)
    return raw, cfg


def read_headers(folder: Path) -> dict[str, TensorInfo]:
    """Every stored tensor of the folder's safetensors files, each header checked in full."""
    infos: dict[str, TensorInfo] = {}
    for path in weight_files(folder):
        for name, info in read_header(path).items():
            if name in infos:
                raise CheckpointError(f"{path}: tensor '{name}' also stored in {infos[name].file.name}; remove the duplicate")
            infos[name] = info
    return infos


def _config_has_matrix(raw: dict[str, Any], key: str) -> bool:
    code = raw.get("code") if isinstance(raw.get("code"), dict) else {}
    return key in code or any(c in raw for c in (key, f"code_{key}", f"affine_{key}"))


def read_code(cfg: ModelConfig, raw: dict[str, Any], mapped: dict[str, TensorInfo], config_path: Path) -> None:
    """A and b from the weights (when stored there) into cfg.code, checked against config.json; validate."""
    for key in ("code.A", "code.b"):
        if key not in mapped:
            continue  # from config.json lists, or the identity recoding
        info = mapped[key]
        t = read_tensor(info).to(torch.int64).numpy()
        if np.any((t != 0) & (t != 1)):
            raise CheckpointError(f"{info.file}: tensor '{info.name}' ({key}) holds values other than 0 and 1; A and b are over GF(2): store 0/1")
        if _config_has_matrix(raw, key[-1]):
            have = cfg.code.A if key == "code.A" else cfg.code.b
            if not np.array_equal(np.asarray(have), t):
                raise CheckpointError(f"{config_path}: code {key[-1]} in config.json differs from tensor '{info.name}' in {info.file.name}; keep one of them")
        setattr(cfg.code, key[-1], t.astype(np.uint8))
    try:
        cfg.validate()
    except ConfigError as e:  # name the file A came from: a weights file or config.json
        where = mapped["code.A"].file if "code.A" in mapped and "singular" in str(e) else config_path
        raise CheckpointError(f"{where}: {e}") from None


def read_weight(info: TensorInfo, target: str) -> torch.Tensor:
    """One float tensor as fp32; NaN or Inf anywhere is refused with the tensor's name."""
    t = read_tensor(info)
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' ({target}) holds {bad} NaN/Inf value(s) of {t.numel()}; "
                              "the weights are corrupt or diverged: re-download the checkpoint or use an earlier one")
    return t


def load_checkpoint(folder: str | Path, key_map: str | Path | KeyMap | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and canonical state dict (floats fp32, code.A/code.b uint8), validated from headers first.

    Without A/b in the weights or the config, the code is the identity recoding (the fixed-code
    sibling of the seed). Bias flags of the returned config come from the weights.
    """
    folder = Path(folder)
    kmap = read_key_map(key_map)
    raw, cfg = check_folder(folder)
    infos = read_headers(folder)
    mapped = map_tensors(infos, kmap, cfg.code.bits, folder)
    detect_biases(cfg, set(mapped))
    config_path = folder / CONFIG_FILE
    check_mapped(cfg, mapped, config_path)
    read_code(cfg, raw, mapped, config_path)
    state: dict[str, torch.Tensor] = {
        "code.A": torch.from_numpy(cfg.code.A.copy()),
        "code.b": torch.from_numpy(cfg.code.b.copy()),
    }
    for target, info in mapped.items():
        if target not in ("code.A", "code.b"):
            state.update(split_fused(target, read_weight(info, target), cfg))
    return cfg, {k: state[k] for k in canonical_shapes(cfg)}


def load_model(folder: str | Path, key_map: str | Path | KeyMap | None = None):
    """An eval-mode fp32 TableFreeLM whose parameters ARE the loaded tensors (no second copy)."""
    from .model import TableFreeLM

    cfg, state = load_checkpoint(folder, key_map=key_map)
    with torch.device("meta"):
        model = TableFreeLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def generation_config(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The generation_config.json every checkpoint we write carries (greedy by default)."""
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "max_length": cfg.max_position_embeddings, "do_sample": False, **extra}


def save_checkpoint(folder: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                    shard_size_bytes: int | None = None, extra_config: dict[str, Any] | None = None,
                    with_generation_config: bool = False) -> None:
    """Write config.json (plus `extra_config` keys) and the canonical tensors in their own dtypes, each
    file atomically; `with_generation_config` adds generation_config.json."""
    folder = Path(folder)
    cfg.validate()
    expected = canonical_shapes(cfg)
    wrong = sorted(set(expected) ^ set(state_dict))
    if wrong:
        raise CheckpointError(f"state dict does not match the config's tensors ({', '.join(wrong[:8])}); pass the model's own state_dict")
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, shape in expected.items():
        t = state_dict[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, config implies {list(shape)}; fix the config or the tensor")
        specs.append((name, DTYPE_NAMES[t.dtype], shape))
    atomic_write_text(folder / CONFIG_FILE, json.dumps({**cfg.to_dict(), **(extra_config or {})}, indent=2) + "\n")
    write_weights(folder, specs, lambda n: state_dict[n], shard_size_bytes)
    if with_generation_config:
        atomic_write_text(folder / GENERATION_CONFIG_FILE, json.dumps(generation_config(cfg), indent=2) + "\n")


__all__ = [
    "CheckpointError", "TensorInfo", "canonical_shapes", "read_header", "read_tensor", "read_key_map",
    "inside_folder", "check_folder", "read_config", "load_checkpoint", "load_model", "save_checkpoint",
    "generation_config",
]
