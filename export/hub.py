"""Where the checkpoint comes from: a local folder, the embedded demo model, or a hub id.

A hub download takes safetensors, json and tokenizer files only: pickles are never fetched, so
they can never be unpickled.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from reference.data import DEMO_MODEL_DIR

from .errors import ExportError

# Files a hub snapshot may bring: weights as safetensors, configs, tokenizer files, the card.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.txt", "*.model", "README.md"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/"))


def resolve_source(model: str | os.PathLike | None, with_code: bool = False) -> tuple[Path, dict]:
    """Return the local checkpoint folder and a record of where it came from (for the manifest).

    `with_code` (--trust-remote-code) also fetches the repository's *.py model code from the hub.
    """
    if model is None:
        if DEMO_MODEL_DIR.is_dir():
            return DEMO_MODEL_DIR, {"path": str(DEMO_MODEL_DIR), "hub_id": None, "demo": True}
        raise ExportError(
            f"no --model given and the embedded demo model {DEMO_MODEL_DIR} is not there yet; "
            "pass --model PATH (a checkpoint folder) or --model OWNER/NAME (a Hugging Face hub id)"
        )
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"--model {model}: is a file, expected a checkpoint folder (config.json + model.safetensors)")
        return path.resolve(), {"path": str(path.resolve()), "hub_id": None}
    text = str(model)
    if looks_like_hub_id(text):
        return download(text, with_code), {"path": None, "hub_id": text}
    raise ExportError(f"--model {model}: no such folder; pass a checkpoint folder or a hub id like OWNER/NAME")


def download(hub_id: str, with_code: bool = False) -> Path:
    """Fetch a hub snapshot (no pickles). Offline or unknown ids give one readable error."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ExportError(
            f"--model {hub_id} looks like a hub id, but huggingface_hub is not installed; "
            "pip install 'tablefree-onnx[hub]', or download the folder yourself and pass its path"
        ) from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        folder = snapshot_download(repo_id=hub_id, allow_patterns=HUB_PATTERNS + (["*.py"] if with_code else []))
    except Exception as e:  # offline, unknown repo, gated repo, ... all end the same way for the user
        kind = type(e).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(
            f"could not fetch hub model {hub_id!r} ({kind}: {first[:200]}); check the id and the network, "
            "or download the folder where you have network access and pass --model PATH"
        ) from None
    return Path(folder)
