"""Where the shared, read-only data lives (../shared/data beside the project root).

A user's fresh clone has no ../shared; code that needs it calls `shared_data_file` and gets an
error that says which file is missing and how to point at it (TABLEFREE_DATA).
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = PROJECT_ROOT / "models" / "shakespeare"


class MissingDataError(FileNotFoundError):
    """A shared data file is absent; the message says which and how to provide it."""


def shared_data_dir() -> Path:
    """$TABLEFREE_DATA if set, else ../shared/data relative to the project root."""
    env = os.environ.get("TABLEFREE_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def shared_data_file(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.is_file():
        raise MissingDataError(
            f"missing data file {path}: it comes from the project's shared data folder "
            f"(../shared/data beside the checkout). Put it there, or set TABLEFREE_DATA to the folder that holds {relative}"
        )
    return path
