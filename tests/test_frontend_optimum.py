"""Hugging Face optimum runs the artifact: `import runtime.hf`, then ORTModelForCausalLM.from_pretrained,
`.generate()` and `pipeline("text-generation")`, io binding off and on; greedy tokens and text
equal the project's runtime.

optimum-onnx 0.1 wants transformers < 4.58, so it lives in its own venv (`make setup-optimum`).
"""
from __future__ import annotations

import pytest

from frontends.shared import (MAX_NEW, PROMPTS, demo_artifact, run_script, runtime_greedy, venv_python,
                              write_json)

MODES = ["arith", pytest.param("bitwise", marks=pytest.mark.slow), pytest.param("lookup", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode", MODES)
def test_optimum_generate_and_pipeline(tmp_path_factory, tmp_path, mode):
    py = venv_python("optimum")
    artifact = demo_artifact(tmp_path_factory, mode)
    folder = artifact
    expected = runtime_greedy(artifact)
    out = run_script(py, "optimum_generate.py", folder, write_json(tmp_path / "prompts.json", PROMPTS), MAX_NEW)
    assert set(out["runs"]) == {"plain", "io_binding"}
    for setting, rows in out["runs"].items():
        for want, got in zip(expected, rows, strict=True):
            where = f"optimum ({setting}) on {got['prompt']!r}"
            assert got["prompt_ids"] == want.prompt_ids, f"{where}: the tokenizer split the prompt differently"
            assert got["ids"] == want.ids, f"{where}: generate() tokens differ from the runtime's"
            assert got["pipeline_text"] == want.text, f"{where}: the pipeline's text differs from the runtime's"


def test_runtime_hf_config_maps_the_artifact(tmp_path_factory):
    """The registered config gives optimum the cache shape it allocates: [batch, heads, 0, hidden/heads]."""
    py = venv_python("optimum")
    folder = demo_artifact(tmp_path_factory, "arith")
    script = tmp_path_factory.mktemp("hf") / "cfg.py"
    script.write_text(
        "import json, sys\nimport runtime.hf\nfrom transformers import AutoConfig\n"
        "c = AutoConfig.from_pretrained(sys.argv[1])\n"
        "print(json.dumps({'cls': type(c).__name__, 'heads': c.num_attention_heads, 'kv': c.num_key_value_heads,"
        " 'head_dim': c.head_dim, 'use_cache': c.use_cache, 'eos': c.eos_token_id, 'code': c.code}))\n")
    import json
    import os
    import subprocess

    from frontends.shared import ROOT

    p = subprocess.run([str(py), str(script), str(folder)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    cfg = json.loads((folder / "config.json").read_text())
    assert got == {"cls": "TablefreeConfig", "heads": cfg["num_attention_heads"], "kv": cfg["num_attention_heads"],
                   "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"], "use_cache": True,
                   "eos": cfg["eos_token_id"], "code": cfg["code"]}
