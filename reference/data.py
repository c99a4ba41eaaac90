"""Where the data that is not part of the repository lives: the TABLEFREE_DATA folder.

Two files are read from it, and only by scripts, never by the test suite or the runtime:
`tinyshakespeare.txt` (the demo model's corpus, `python -m reference.train`) and
`bvv241/ngrams-2-3.txt` (the n-gram list the committed bvv241 tokenizer was built from, used to
rebuild it and by the one test that compares the rebuild with the committed files).

TABLEFREE_DATA names that folder. Unset, the folder is `data/` inside the project root (absent in a
fresh clone). Code that needs a file calls `shared_data_file` and gets a `MissingDataError` that
names the missing file and says to set TABLEFREE_DATA.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = PROJECT_ROOT / "models" / "shakespeare"
DATA_ENV = "TABLEFREE_DATA"


class MissingDataError(FileNotFoundError):
    """A data file is absent; the message says which and how to provide it."""


def shared_data_dir() -> Path:
    """$TABLEFREE_DATA if set, else data/ in the project root."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else PROJECT_ROOT / "data"


def shared_data_file(relative: str) -> Path:
    """The path of `relative` inside the data folder, or a MissingDataError naming it and the fix."""
    path = shared_data_dir() / relative
    if not path.is_file():
        raise MissingDataError(
            f"missing data file {path}: it is not part of the repository. "
            f"Set {DATA_ENV} to the folder that holds {relative}"
        )
    return path
