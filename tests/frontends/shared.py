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
import shutil
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


_BUILT: dict[str, Path] = {}


def demo_artifact(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Path:
    """`make demo`'s artifact (models/shakespeare) exported with lift mode `mode`, built once per session."""
    if mode not in _BUILT:
        from export.build import build

        out = tmp_path_factory.mktemp(f"frontend-{mode}") / f"shakespeare-{mode}"
        _BUILT[mode] = build(ROOT / "models" / "shakespeare", out, code=mode, log=lambda m: None)
    return Path(_BUILT[mode])


# ---- until the exporter ships these itself (lead: delete this block after the merge) ----------------
_OPTIMUM_DIMS = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length",
                 "total": "past_sequence_length + sequence_length",
                 "past + seq": "past_sequence_length + sequence_length", "kept_seq": "sequence_length"}


def as_shipped(artifact: Path, dest: Path) -> Path:
    """A copy of `artifact` with what the exporter will ship: the genai-form tokenizer.json
    (export/tokenizer_files.py), model.genai.onnx + genai_config.kv.json (graphs/genai_kv.py),
    optimum's dimension names and tokenizer_config's model_input_names. Parts already there are kept."""
    import onnx

    from export.tokenizer_files import write_genai_tokenizer
    from graphs.genai_kv import GENAI_KV_MODEL_FILE, genai_kv_config, write_genai_kv_graph

    if not dest.exists():
        shutil.copytree(artifact, dest)
        cfg = json.loads((dest / "config.json").read_text())
        tok = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
        if (tok.get("pre_tokenizer") or {}).get("type") != "Split":
            write_genai_tokenizer(dest, int(cfg["vocab_size"]))
        if not (dest / GENAI_KV_MODEL_FILE).exists():
            write_genai_kv_graph(dest)
        genai = json.loads((dest / "genai_config.json").read_text())
        (dest / "genai_config.kv.json").write_text(json.dumps(genai_kv_config(genai, int(cfg["num_attention_heads"])), indent=2))
        tc = json.loads((dest / "tokenizer_config.json").read_text())
        tc.setdefault("model_input_names", ["input_ids", "attention_mask"])
        (dest / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        path = dest / "model.onnx"
        m = onnx.load(str(path), load_external_data=False)
        for v in list(m.graph.input) + list(m.graph.output):
            for d in v.type.tensor_type.shape.dim:
                d.dim_param = _OPTIMUM_DIMS.get(d.dim_param, d.dim_param)
        path.write_bytes(m.SerializeToString())
    return dest
# ------------------------------------------------------------------------------------------------------


def genai_kv_folder(shipped: Path, dest: Path) -> Path:
    """genai reads genai_config.json from the model folder: a folder whose config is the shared-buffer one."""
    if not dest.exists():
        dest.mkdir(parents=True)
        for p in shipped.iterdir():
            if p.name != "genai_config.json":
                (dest / p.name).symlink_to(p)
        shutil.copyfile(shipped / "genai_config.kv.json", dest / "genai_config.json")
    return dest


def runtime_greedy(artifact: Path, prompts: list[str] = PROMPTS, max_new: int = MAX_NEW) -> list[Any]:
    """The oracle: the project's runtime (gated against the PyTorch reference) on the unmodified artifact."""
    import runtime

    m = runtime.load(artifact, provider="cpu")
    return [m.generate(p, max_new_tokens=max_new) for p in prompts]


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


__all__ = ["venv_python", "run_script", "demo_artifact", "as_shipped", "genai_kv_folder", "runtime_greedy",
           "write_json", "PROMPTS", "MAX_NEW"]
