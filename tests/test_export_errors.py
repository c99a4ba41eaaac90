"""Bad input to `python -m export build` (SPEC 6): each case is one readable line on stderr, exit
status 2, no traceback, and nothing half-written at --out or beside it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env_extra: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "export", "build", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_error(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w.lower() in errors[0].lower(), errors[0]
    return errors[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}.*")], list(out.parent.iterdir())


def test_missing_folder(tmp_path):
    out = tmp_path / "art"
    res = cli("--model", str(tmp_path / "nope"), "--out", str(out))
    assert_clean_error(res, "no such folder")
    assert_nothing_written(out)


def test_pickle_only_folder(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(tiny_ckpt / "config.json", ckpt / "config.json")
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04\x95not really a pickle")
    out = tmp_path / "art"
    msg = assert_clean_error(cli("--model", str(ckpt), "--out", str(out)))
    assert "safetensors" in msg or "pickle" in msg
    assert_nothing_written(out)


def test_singular_A(tmp_path, tiny_ckpt):
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "singular"
    shutil.copytree(tiny_ckpt, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    A = tensors["code.A"].copy()
    A[1] = A[0]  # two equal rows: rank < K over GF(2)
    tensors["code.A"] = A
    save_file(tensors, str(ckpt / "model.safetensors"))
    out = tmp_path / "art"
    assert_clean_error(cli("--model", str(ckpt), "--out", str(out)), "singular")
    assert_nothing_written(out)


def test_existing_out_is_kept(tmp_path, tiny_ckpt):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("old artifact")
    assert_clean_error(cli("--model", str(tiny_ckpt), "--out", str(out)), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "old artifact"
    assert sorted(p.name for p in out.parent.iterdir()) == ["art"]


def test_unwritable_out(tmp_path, tiny_ckpt):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "art"  # a folder below a regular file cannot be created, even by root
    assert_clean_error(cli("--model", str(tiny_ckpt), "--out", str(out)), "cannot write")
    assert blocker.read_text() == "x"


def test_bitwise_on_cuda_refused(tmp_path, tiny_ckpt):
    out = tmp_path / "art"
    msg = assert_clean_error(cli("--model", str(tiny_ckpt), "--out", str(out), "--code", "bitwise",
                                 "--provider", "cuda"), "bitwise")
    assert "arith" in msg
    assert_nothing_written(out)


def test_unknown_hub_id_offline(tmp_path):
    out = tmp_path / "art"
    msg = assert_clean_error(cli("--model", "nobody-here/no-such-model-xyz", "--out", str(out)),
                             "nobody-here/no-such-model-xyz")
    assert "network" in msg or "offline" in msg.lower()
    assert_nothing_written(out)


def test_failed_gate_keeps_old_artifact(tmp_path, tiny_ckpt, tiny_artifacts):
    """--force with a build that fails the gate: the old artifact stays byte-identical, the failure is parked."""
    from export.build import build
    from export.errors import ExportError
    from reference.checkpoint import load_checkpoint

    out = tmp_path / "art"
    shutil.copytree(tiny_artifacts("arith"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cfg, _ = load_checkpoint(tiny_ckpt)
    wrong = type(cfg.code)(**{**cfg.code.to_dict(with_matrix=False), "A": cfg.code.A,
                              "b": np.asarray(cfg.code.b) ^ 1})
    with pytest.raises(ExportError, match="art.failed"):
        build(tiny_ckpt, out, lift_mode="arith", force=True, log=lambda m: None, _lift_code=wrong)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp_path / "art.failed" / "manifest.json").is_file()


def test_help_explains_every_choice():
    res = subprocess.run([sys.executable, "-m", "export", "build", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert res.returncode == 0
    for word in ("--model", "--out", "bitwise", "arith", "lookup", "fp16", "int8", "int4", "--provider",
                 "--opset", "--trust-remote-code", "--key-map", "--force", "--no-verify", "--bit-order",
                 "--values", "--tiling", "--scale"):
        assert word in res.stdout, word
