"""What the front-end tests share: the other venvs' pythons, the demo artifacts, running a script there.

The front ends (onnxruntime-genai, optimum) conflict with the main venv (their own onnxruntime,
transformers < 4.58), so each lives in a venv of its own made by `make setup-genai` /
`make setup-optimum` (.venvs/NAME; TABLEFREE_GENAI_PYTHON / TABLEFREE_OPTIMUM_PYTHON point
elsewhere). A test runs a script of this folder there and compares its JSON with the runtime here.
A missing venv skips with the command that makes it, except under CI, where it fails.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENVS = {"genai": ("TABLEFREE_GENAI_PYTHON", "setup-genai"), "optimum": ("TABLEFREE_OPTIMUM_PYTHON", "setup-optimum")}
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo! wherefore art thou",
           "First Citizen:\nBefore we proceed any further, hear me speak."]
MAX_NEW = 40


def venv_python(name: str) -> Path:
    """The python of venv `name`; skips (fails under CI) with the make target when it is missing."""
    var, target = VENVS[name]
    py = Path(os.environ.get(var) or ROOT / ".venvs" / name / "bin" / "python")
    if not py.is_file():
        msg = f"no {name} venv at {py}: run `make {target}` (or set {var})"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI must run every front-end test")
        pytest.skip(msg)
    return py


def run_script(python: Path, script: str, *args: str | Path, timeout: int = 900) -> dict[str, Any]:
    """Run tests/frontends/`script` under `python` with the project on PYTHONPATH; its stdout is one JSON object."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([str(python), str(HERE / script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise AssertionError(f"{script} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def demo_artifact(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Path:
    """`make demo`'s artifact with lift mode `mode` (tests/demo.py: built once per test process)."""
    from demo import demo_artifact as build_once

    return build_once(mode)


def runtime_greedy(artifact: Path, prompts: list[str] = PROMPTS, max_new: int = MAX_NEW) -> list[Any]:
    """The oracle: the project's runtime (gated against the PyTorch reference) on the unmodified artifact."""
    import runtime

    m = runtime.load(artifact, provider="cpu")
    return [m.generate(p, max_new_tokens=max_new) for p in prompts]


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


__all__ = ["venv_python", "run_script", "demo_artifact", "runtime_greedy",
           "write_json", "PROMPTS", "MAX_NEW"]
