"""--trust-remote-code (SPEC 2): the folder's own model code is run, compared, and its conventions found.

The oracle is tests/remote_code/modeling_fixcode.py: a model written apart from reference/, in
the style of the seed checkpoint's remote code (nanoGPT names, A/b as uint8 tensors, conventions
hard-coded and different from the SPEC defaults: +-1 values, interleave tiling, interleaved RoPE,
GELU tanh). config.json says none of that, as the real checkpoint does not.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from export.build import build  # noqa: E402
from export.errors import ExportError  # noqa: E402

CODE_DIR = Path(__file__).parent / "remote_code"
ROOT = Path(__file__).resolve().parent.parent
D, LAYERS, HEADS, V = 64, 2, 4, 65536
FOUND = {"values": "plus_minus_one", "tiling": "interleave", "rope_pairing": "interleaved", "hidden_act": "gelu_tanh"}


def make_folder(folder: Path, tokenizer_dir: Path, embedding_scale: float = 1.0) -> Path:
    """A checkpoint folder as its author would publish it: own code, nanoGPT tensor names, no conventions."""
    from safetensors.torch import save_file

    from reference.lift import random_invertible_gf2

    folder.mkdir(parents=True)
    for f in CODE_DIR.glob("*.py"):
        shutil.copy(f, folder / f.name)
    config = {
        "model_type": "model_binary_affine_code_test",
        "architectures": ["FixCodeForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_fixcode.FixCodeConfig",
                     "AutoModelForCausalLM": "modeling_fixcode.FixCodeForCausalLM"},
        "vocab_size": V, "n_embd": D, "n_layer": LAYERS, "n_head": HEADS, "block_size": 128,
        "embedding_scale": embedding_scale, "bos_token_id": 57345, "eos_token_id": 57346, "pad_token_id": 57344,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(7)

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    A, b = random_invertible_gf2(16, seed=3)
    sd = {"transformer.affine_A": torch.as_tensor(A, dtype=torch.uint8),
          "transformer.affine_b": torch.as_tensor(b, dtype=torch.uint8),
          "transformer.ln_f.weight": 1 + w(D), "transformer.ln_f.bias": w(D), "lm_head.weight": w(V, D, std=0.5)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + w(D), p + "ln_1.bias": w(D), p + "ln_2.weight": 1 + w(D), p + "ln_2.bias": w(D),
                   p + "attn.c_attn.weight": w(3 * D, D, std=0.3), p + "attn.c_attn.bias": w(3 * D),
                   p + "attn.c_proj.weight": w(D, D), p + "attn.c_proj.bias": w(D),
                   p + "mlp.c_fc.weight": w(4 * D, D, std=0.2), p + "mlp.c_fc.bias": w(4 * D),
                   p + "mlp.c_proj.weight": w(D, 4 * D), p + "mlp.c_proj.bias": w(D)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def folder_model(folder: Path):
    """The oracle: the folder's model loaded by transformers itself, not through our code."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def remote_folder(tmp_path_factory, bvv241_dir) -> Path:
    return make_folder(tmp_path_factory.mktemp("remote") / "fixcode_match", bvv241_dir)


@pytest.fixture(scope="module")
def remote_artifact(tmp_path_factory, remote_folder) -> tuple[Path, list[str]]:
    logs: list[str] = []
    out = build(remote_folder, tmp_path_factory.mktemp("remote_out") / "art", lift_mode="arith", trust_remote_code=True,
                log=logs.append)
    return out, logs


def test_the_files_that_will_run_are_named_first(remote_artifact):
    """Before transformers runs anything, the build names the folder's files it will run (auto_map's
    modules and what they import from the folder)."""
    _, logs = remote_artifact
    said = next(i for i, m in enumerate(logs) if "will run code from" in m)
    ran = next(i for i, m in enumerate(logs) if "remote code:" in m)
    assert said < ran
    assert "modeling_fixcode.py" in logs[said] and "configuration_fixcode.py" in logs[said]


def test_search_reports_the_conventions_of_the_folders_code(remote_artifact):
    out, logs = remote_artifact
    line = next(m for m in logs if "remote code" in m)
    for key, value in FOUND.items():
        assert f"{key}" in line and value in line, line
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["source"]["remote_code"]
    assert {k: v["now"] for k, v in check["changed"].items()} == FOUND
    assert check["max_rel_diff"] <= 1e-4
    assert manifest["lift"]["values"] == "plus_minus_one" and manifest["lift"]["tiling"] == "interleave"
    config = json.loads((out / "config.json").read_text())
    assert config["rope_pairing"] == "interleaved" and config["hidden_act"] == "gelu_tanh"
    assert manifest["parity"]["passed"] is True


def test_artifact_computes_what_the_folders_code_computes(remote_artifact, remote_folder):
    """ONNX Runtime on the artifact vs transformers on the folder's own code: logits and greedy tokens."""
    import runtime

    out, _ = remote_artifact
    oracle = folder_model(remote_folder)
    ids = np.random.default_rng(0).integers(0, V, size=(1, 20))
    ids[0, :2] = [0, V - 1]
    with torch.no_grad():
        want = oracle(input_ids=torch.as_tensor(ids)).logits.numpy()
    model = runtime.load(out, provider="cpu")
    got = model.forward(ids).logits
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    seq = [int(t) for t in ids[0, :5]]
    with torch.no_grad():
        for _ in range(16):  # the oracle has no cache: greedy by re-running the whole prefix
            nxt = int(oracle(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
    assert model.generate([int(t) for t in ids[0, :5]], max_new_tokens=16).ids == seq[5:]


def test_a_scale_an_author_would_pick_is_found(tmp_path, bvv241_dir):
    """embedding_scale 2 = sqrt(d/K) at d 64, K 16: one of the scales the search tries; found on the lift alone."""
    from export.build import load_reference
    from export.remote import check_remote

    folder = make_folder(tmp_path / "fixcode_sqrt", bvv241_dir, embedding_scale=2.0)
    check = check_remote(folder, load_reference(folder, None, {}), log=lambda m: None)
    assert check.changed["scale"] == (1.0, 2.0) and check.max_rel_diff <= 1e-4
    assert check.stages["agree"] and check.stages["first_difference"] is None
    assert check.steps[0]["differs_at"] == "the lift"  # the first step searched the code's fields


def test_code_outside_the_spec_is_refused(tmp_path, bvv241_dir):
    """A scale no author would pick (3): the lift never agrees, the refusal says so, nothing is written."""
    folder = make_folder(tmp_path / "fixcode_scaled", bvv241_dir, embedding_scale=3.0)
    out = tmp_path / "art"
    with pytest.raises(ExportError) as e:
        build(folder, out, lift_mode="arith", trust_remote_code=True, log=lambda m: None)
    msg = str(e.value)
    assert "Stage by stage on the probe ids: the lift differs" in msg and "Nothing was exported" in msg, msg
    assert not out.exists() and not list(tmp_path.glob(".art*"))


def test_folder_without_code_is_refused_readably(tiny_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"),
                        "--trust-remote-code"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2
    assert "no auto_map" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_missing_transformers_names_the_extra(tiny_ckpt, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ExportError, match=r"tablefree-onnx\[remote\]"):
        build(tiny_ckpt, tmp_path / "o", trust_remote_code=True, log=lambda m: None)


def test_without_the_flag_the_code_is_not_run_but_mentioned(remote_folder, tmp_path, monkeypatch):
    import export.remote

    def boom(*a, **k):
        raise AssertionError("the folder's code was loaded without --trust-remote-code")

    monkeypatch.setattr(export.remote, "load_remote_model", boom)
    logs: list[str] = []
    build(remote_folder, tmp_path / "o", lift_mode="arith", verify=False, log=logs.append)
    assert any("ships its own model code" in m and "--trust-remote-code" in m for m in logs)
