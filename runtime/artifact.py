"""Reading an artifact folder: the manifest checks that run before any session is created.

A 2 GB weights file that was cut short by a failed download is the common failure; checking
sizes costs one stat per file, so it is the default. sha256 reads every byte and is on request.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactVersionError, RuntimeArtifactError
from .interface import (
    CONFIG_FILE,
    DATA_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    GENERATION_CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
)

VERIFY_MODES = ("size", "sha256", "none")


@dataclass
class ArtifactInfo:
    """What the runtime needs from the folder's JSON files (no weights)."""

    folder: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def context_length(self) -> int:
        return int(self.config["max_position_embeddings"])

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
    if not isinstance(data, dict):
        raise RuntimeArtifactError(f"{path} must hold a JSON object; re-export or re-download the folder")
    return data


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_manifest(folder: Path, manifest: dict[str, Any], verify: str) -> None:
    """Format name and version always; then file presence and size ("size") or hash ("sha256")."""
    fmt = manifest.get("format")
    if fmt != FORMAT_NAME:
        raise RuntimeArtifactError(
            f"{folder / MANIFEST_FILE}: format is {fmt!r}, not {FORMAT_NAME!r}; this folder was not written by "
            "tablefree-onnx (export it with `python -m export build`)"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise RuntimeArtifactError(f"{folder / MANIFEST_FILE}: format_version {version!r} is not an integer; re-export the folder")
    if version > FORMAT_VERSION:
        raise ArtifactVersionError(
            f"{folder} uses artifact format v{version} but this runtime reads up to v{FORMAT_VERSION}: "
            "upgrade tablefree-onnx (pip install -U tablefree-onnx)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise RuntimeArtifactError(f"{folder / MANIFEST_FILE} lists no files (or not {MODEL_FILE}); re-export the folder")
    if verify == "none":
        return
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise RuntimeArtifactError(f"missing {name} in {folder}: re-export or re-download the folder")
        size = path.stat().st_size
        want = int(entry.get("size", -1))
        if want >= 0 and size != want:
            kind = "truncated" if size < want else "oversized"
            raise RuntimeArtifactError(
                f"{kind} {name} in {folder} ({size:,} bytes, manifest says {want:,}): re-export or re-download"
            )
    if verify == "sha256":
        for name, entry in files.items():
            want = entry.get("sha256")
            if want and sha256_file(folder / name) != want:
                raise RuntimeArtifactError(
                    f"sha256 of {name} in {folder} differs from the manifest: the file is corrupt or was changed; "
                    "re-export or re-download"
                )


def read_artifact(folder: str | Path, verify: str = "size") -> ArtifactInfo:
    """Everything that can be checked without ONNX Runtime, in the order a user would fix it."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r} is not one of {VERIFY_MODES}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise RuntimeArtifactError(f"{folder} is not a folder; pass the folder that `python -m export build` wrote")
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file() or verify != "none":
        manifest = _read_json(manifest_path, "not an exported artifact; export one with `python -m export build`")
        check_manifest(folder, manifest, verify)
    else:
        manifest = {}
    if not (folder / MODEL_FILE).is_file():
        raise RuntimeArtifactError(f"missing {MODEL_FILE} in {folder}: re-export or re-download the folder")
    listed = manifest.get("files", {})
    if DATA_FILE in listed and not (folder / DATA_FILE).is_file():
        raise RuntimeArtifactError(f"missing {DATA_FILE} in {folder}: re-export or re-download the folder")
    config = _read_json(folder / CONFIG_FILE, "the artifact needs the model's config.json; re-export the folder")
    for key in ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "max_position_embeddings"):
        if not isinstance(config.get(key), int):
            raise RuntimeArtifactError(f"{folder / CONFIG_FILE} has no integer {key!r}; re-export the folder")
    gen_path = folder / GENERATION_CONFIG_FILE
    gen = _read_json(gen_path, "") if gen_path.is_file() else {}
    return ArtifactInfo(folder=folder, manifest=manifest, config=config, generation_config=gen)
