"""The demo model (models/shakespeare) exported once per test process and lift mode, for the tests
that run an artifact through another front end (genai, optimum, Node, the browser, the server).

Built with the parity gate on, like `make demo`: a front end is compared with the Python runtime on
a folder that is known to compute what the reference computes.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = ROOT / "models" / "shakespeare"
_built: dict[str, Path] = {}


def demo_artifact(mode: str = "arith") -> Path:
    """`python -m export build --code MODE` of the demo model, in a temp folder removed at exit."""
    if mode not in _built:
        from export.build import build

        root = Path(tempfile.mkdtemp(prefix=f"tablefree-demo-{mode}-"))
        atexit.register(shutil.rmtree, root, True)
        _built[mode] = build(DEMO_MODEL_DIR, root / f"shakespeare-{mode}", lift_mode=mode, log=lambda m: None)
    return _built[mode]
