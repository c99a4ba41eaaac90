"""Helpers of the JavaScript front-end tests (test_frontend_js.py, test_web.py): the demo
artifacts, the Python runtime's tokens they are compared with, and running the Node scripts of
tests/js.

The tools (node, the npm packages of tests/js, Debian's chromium) come from `make setup-js`.
Missing, a test skips with the reason locally, but FAILS where the environment variable CI is set:
CI must run these front ends, not skip them quietly.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS_DIR = ROOT / "tests" / "js"
DEMO_MODEL_DIR = ROOT / "models" / "shakespeare"
NEW_TOKENS = 40
PROMPTS = ("ROMEO:", "First Citizen:\nWe are accounted poor citizens", "KING RICHARD III:\nNow is the winter of")
NODE_TIMEOUT_S = 300

_expected: dict[tuple[str, int], list[list[int]]] = {}


def need(*, node_packages: tuple[str, ...] = (), chromium: bool = False) -> dict[str, str]:
    """Skip (locally) or fail (CI set) unless the tools are there; the environment for node."""
    missing = []
    if shutil.which("node") is None:
        missing.append("node")
    missing += [f"tests/js/node_modules/{p}" for p in node_packages if not (JS_DIR / "node_modules" / p).is_dir()]
    env = dict(os.environ)
    if chromium:
        path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
        if path is None:
            missing.append("chromium")
        else:
            env["CHROMIUM_PATH"] = path
    if missing:
        msg = f"JavaScript front end not installed (missing: {', '.join(missing)}): run `make setup-js`"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: these tests must run there)", pytrace=False)
        pytest.skip(msg)
    return env


def demo_artifact(mode: str) -> Path:
    """The demo model exported with lift `mode`, once per test process (tests/demo.py)."""
    from demo import demo_artifact as build_once

    return build_once(mode)


def runtime_ids(mode: str, max_new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """The Python runtime's greedy continuation of each of PROMPTS (token ids): the oracle."""
    key = (mode, max_new_tokens)
    if key not in _expected:
        import runtime

        m = runtime.load(demo_artifact(mode), provider="cpu")
        _expected[key] = [m.generate(p, max_new_tokens=max_new_tokens).ids for p in PROMPTS]
    return _expected[key]


def prompt_ids(mode: str) -> list[list[int]]:
    import runtime

    m = runtime.load(demo_artifact(mode), provider="cpu")
    return [m.encode(p) for p in PROMPTS]


def node(script: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
         timeout: float = NODE_TIMEOUT_S) -> object:
    """Run tests/js/SCRIPT with node; its last stdout line parsed as JSON (stderr shown on failure)."""
    p = subprocess.run(["node", script, *args], cwd=JS_DIR, input=stdin, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if p.returncode != 0:
        raise AssertionError(f"node {script} exited with {p.returncode}:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
