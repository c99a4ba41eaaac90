"""Reading an artifact folder: the manifest checks that run before any session is created.

By default (verify="sha256") every file the runtime reads must be listed in manifest.json with its
size and sha256, and every listed file must match: a flipped byte in the weights otherwise runs and
prints wrong text. Hashes are remembered per file stamp (runtime/integrity.py), so only the first
load of a folder pays for reading every byte. verify="size" checks the listing and the sizes (one
stat per file: a cut-short download); verify="none" checks nothing but the manifest's format.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactVersionError, RuntimeArtifactError
from .integrity import StampCache, check_sha256, sha256_file  # noqa: F401 - sha256_file: export/artifact.py
from .interface import (
    CONFIG_FILE,
    DATA_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    GENERATION_CONFIG_FILE,
    KV_MODEL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILES,
)

VERIFY_MODES = ("sha256", "size", "none")
DEFAULT_VERIFY = "sha256"
# every file the runtime (or ONNX Runtime on its behalf) reads; each one in the folder must be listed
READ_FILES = (MODEL_FILE, DATA_FILE, KV_MODEL_FILE, CONFIG_FILE, TOKENIZER_FILES[0], TOKENIZER_FILES[1],
              GENERATION_CONFIG_FILE)
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE)
CONFIG_INTS = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "max_position_embeddings")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "re-export the folder with `python -m export build` (or re-download it)"


@dataclass
class ArtifactInfo:
    """What the runtime needs from the folder's JSON files (no weights)."""

    folder: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # the server's chat template lives here

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def head_size(self) -> int:
        return int(self.config["hidden_size"]) // self.num_heads

    @property
    def context_length(self) -> int:
        return int(self.config["max_position_embeddings"])

    def listed(self, name: str) -> bool:
        return name in (self.manifest.get("files") or {})

    def token_id(self, key: str) -> int | list[int] | None:
        """generation_config.json wins over config.json, as in transformers."""
        value = self.generation_config.get(key, self.config.get(key))
        return value


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeArtifactError(f"missing {path.name} in {path.parent}: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeArtifactError(f"{path} is not valid JSON ({e}); re-export or re-download the folder") from None
    except OSError as e:
        raise RuntimeArtifactError(f"cannot read {path} ({e.strerror}); check the folder's permissions") from None
    if not isinstance(data, dict):
        raise RuntimeArtifactError(f"{path} must hold a JSON object; re-export or re-download the folder")
    return data


def check_format(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Format name and version; returns the `files` table."""
    fmt = manifest.get("format")
    if fmt != FORMAT_NAME:
        raise RuntimeArtifactError(
            f"{folder / MANIFEST_FILE}: format is {fmt!r}, not {FORMAT_NAME!r}; this folder was not written by "
            "tablefree-onnx (export it with `python -m export build`)"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RuntimeArtifactError(f"{folder / MANIFEST_FILE}: format_version {version!r} is not an integer; re-export the folder")
    if version > FORMAT_VERSION:
        raise ArtifactVersionError(
            f"{folder} uses artifact format v{version} but this runtime reads up to v{FORMAT_VERSION}: "
            "upgrade tablefree-onnx (pip install -U tablefree-onnx)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise RuntimeArtifactError(f"{folder / MANIFEST_FILE} lists no files (or not {MODEL_FILE}); re-export the folder")
    return files


def check_manifest(folder: Path, manifest: dict[str, Any], verify: str, stamps: StampCache | None = None) -> None:
    """Format always; with "size" or "sha256": every file the runtime reads is listed with a size and
    a sha256, every listed file is present at its size; with "sha256" every listed file's hash."""
    files = check_format(folder, manifest)
    if verify == "none":
        return
    for name in READ_FILES:
        if name in files:
            continue
        if name in REQUIRED_FILES or (folder / name).exists():
            raise RuntimeArtifactError(f"{folder / MANIFEST_FILE} does not list {name}, which the runtime reads, so "
                                       f"its integrity cannot be checked; {_FIX}")
    for name, entry in files.items():
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise RuntimeArtifactError(f"{folder / MANIFEST_FILE} gives no valid sha256 for {name} ({sha!r}); {_FIX}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RuntimeArtifactError(f"{folder / MANIFEST_FILE} gives no valid size for {name} ({size!r}); {_FIX}")
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise RuntimeArtifactError(f"{folder / MANIFEST_FILE} lists {name!r}, outside the folder; {_FIX}")
        if not path.is_file():
            raise RuntimeArtifactError(f"missing {name} in {folder}: re-export or re-download the folder")
        actual = path.stat().st_size
        if actual != size:
            kind = "truncated" if actual < size else "oversized"
            raise RuntimeArtifactError(
                f"{kind} {name} in {folder} ({actual:,} bytes, manifest says {size:,}): re-export or re-download"
            )
    if verify == "sha256":
        stamps = stamps if stamps is not None else StampCache()
        try:
            for name, entry in files.items():
                try:
                    ok = check_sha256(folder / name, entry["sha256"], stamps)
                except OSError as e:
                    raise RuntimeArtifactError(f"cannot read {folder / name} ({e.strerror}); check the folder's "
                                               "permissions") from None
                if not ok:
                    raise RuntimeArtifactError(
                        f"sha256 of {name} in {folder} differs from the manifest: the file is corrupt or was changed; "
                        "re-export or re-download"
                    )
        finally:
            stamps.save()  # the files that did match stay remembered


def _check_config(path: Path, config: dict[str, Any]) -> None:
    for key in CONFIG_INTS:
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RuntimeArtifactError(f"{path}: {key} = {v!r} is not a positive integer; re-export the folder")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise RuntimeArtifactError(f"{path}: hidden_size {config['hidden_size']} is not a multiple of "
                                   f"num_attention_heads {config['num_attention_heads']}; re-export the folder")


def read_artifact(folder: str | Path, verify: str = DEFAULT_VERIFY, stamps: StampCache | None = None) -> ArtifactInfo:
    """Everything that can be checked without ONNX Runtime, in the order a user would fix it."""
    if verify not in VERIFY_MODES:
        from .errors import InputError

        raise InputError(f"verify={verify!r} is not one of {VERIFY_MODES}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise RuntimeArtifactError(f"{folder} is not a folder; pass the folder that `python -m export build` wrote")
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file() or verify != "none":
        manifest = _read_json(manifest_path, "not an exported artifact; export one with `python -m export build`")
        check_manifest(folder, manifest, verify, stamps)
    else:
        manifest = {}
    if not (folder / MODEL_FILE).is_file():
        raise RuntimeArtifactError(f"missing {MODEL_FILE} in {folder}: re-export or re-download the folder")
    if DATA_FILE in manifest.get("files", {}) and not (folder / DATA_FILE).is_file():
        raise RuntimeArtifactError(f"missing {DATA_FILE} in {folder}: re-export or re-download the folder")
    config_path = folder / CONFIG_FILE
    config = _read_json(config_path, "the artifact needs the model's config.json; re-export the folder")
    _check_config(config_path, config)
    gen_path = folder / GENERATION_CONFIG_FILE
    gen = _read_json(gen_path, "") if gen_path.is_file() else {}
    tc_path = folder / TOKENIZER_FILES[1]
    tc = _read_json(tc_path, "") if tc_path.is_file() else {}
    return ArtifactInfo(folder=folder, manifest=manifest, config=config, generation_config=gen, tokenizer_config=tc)
