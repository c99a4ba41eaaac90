"""Bad input (SPEC 6): one readable line, raised before any Run, never a crash inside ONNX Runtime."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import interface as I
from runtime.errors import (ArtifactVersionError, ContextLengthError, InputError, MissingDependencyError,
                            ProviderError, RuntimeArtifactError)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tiny_artifacts):
    return runtime.load(tiny_artifacts("bitwise"), provider="cpu")


@pytest.fixture
def no_run(model, monkeypatch):
    """Any Run during the test is a failure: the checks must come first (every session, both graphs)."""
    import onnxruntime as ort

    def boom(*a, **k):
        raise AssertionError("ONNX Runtime was asked to run before the input was checked")

    for name in ("run", "run_with_iobinding", "run_with_ort_values"):
        monkeypatch.setattr(ort.InferenceSession, name, boom)
    return model


@pytest.fixture
def copy(tiny_artifacts, tmp_path):
    dst = tmp_path / "artifact"
    shutil.copytree(tiny_artifacts("bitwise"), dst)
    return dst


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_ids_out_of_range(no_run):
    V = no_run.vocab_size
    for bad, shown in (([5, V, 7], str(V)), ([-1], "-1"), ([[1, 2], [3, V + 5]], str(V + 5))):
        with pytest.raises(InputError) as e:
            no_run.generate(bad, max_new_tokens=4)
        assert shown in one_line(e) and f"[0, {V})" in str(e.value)
    with pytest.raises(InputError):
        no_run.generate([1, 2], max_new_tokens=4, stop=[V])
    with pytest.raises(InputError):
        no_run.score([3, 4, V])


def test_empty_prompts(no_run):
    for bad in ("", [], ["a prompt", ""], [[1, 2], []]):
        with pytest.raises(InputError) as e:
            no_run.generate(bad, max_new_tokens=4)
        assert "empty" in one_line(e)
    with pytest.raises(InputError):
        list(no_run.stream("", max_new_tokens=4))
    with pytest.raises(InputError):
        no_run.score("a")  # one token: nothing to predict


def test_prompt_longer_than_context(no_run):
    C = no_run.context_length
    with pytest.raises(ContextLengthError) as e:
        no_run.generate([65] * (C + 1), max_new_tokens=1)
    assert str(C) in one_line(e) and "shorten" in str(e.value)
    with pytest.raises(ContextLengthError) as e:
        no_run.generate([65] * (C - 4), max_new_tokens=10)
    assert "max_new_tokens to 4" in one_line(e)
    with pytest.raises(ContextLengthError):
        no_run.forward(np.ones((1, C + 1), np.int64))


def test_bad_generation_arguments(no_run):
    for kw in (dict(max_new_tokens=0), dict(do_sample=True, temperature=-1.0), dict(do_sample=True, top_p=0.0),
               dict(do_sample=True, top_p=1.5), dict(do_sample=True, top_k=-3), dict(repetition_penalty=0.0),
               dict(min_new_tokens=9, max_new_tokens=4), dict(stop="")):
        with pytest.raises(InputError) as e:
            no_run.generate("hello", **{"max_new_tokens": 4, **kw})
        one_line(e)
    with pytest.raises(InputError):
        list(no_run.stream(["a", "b"], max_new_tokens=4))


def test_forward_wrong_dtypes_and_shapes(no_run):
    ids = np.array([[1, 2, 3]], np.int64)
    for kwargs, word in (
        (dict(input_ids=ids.astype(np.int32)), "int64"),
        (dict(input_ids=ids.astype(np.float32)), "int64"),
        (dict(input_ids=ids, attention_mask=np.ones((1, 3), np.int32)), "int64"),
        (dict(input_ids=ids, attention_mask=np.ones((1, 4), np.int64)), "shape"),
        (dict(input_ids=ids, position_ids=np.zeros((1, 2), np.int64)), "shape"),
        (dict(input_ids=[[1, 2, 3], [4, 5]]), "unequal"),
        (dict(input_ids=np.array([1, 2, 3], np.int64)), "2-D"),
    ):
        with pytest.raises(InputError) as e:
            no_run.forward(**kwargs)
        assert word in one_line(e), kwargs
    L, H, hs = no_run.num_layers, no_run.num_heads, no_run.head_size
    f64 = [np.zeros((1, H, 2, hs), np.float64)] * (2 * L)
    with pytest.raises(InputError) as e:
        no_run.forward(ids, past_key_values=f64)
    assert "float64" in one_line(e)
    with pytest.raises(InputError):
        no_run.forward(ids, past_key_values=[np.zeros((1, H, 2, hs), np.float32)] * (2 * L - 1))
    with pytest.raises(InputError):
        no_run.forward(ids, past_key_values=[np.zeros((1, H + 1, 2, hs), np.float32)] * (2 * L))


def test_missing_weights_file(copy):
    (copy / I.DATA_FILE).unlink()
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu")
    assert I.DATA_FILE in one_line(e) and "re-export or re-download" in str(e.value)
    with pytest.raises(RuntimeArtifactError):  # even without the size check
        runtime.load(copy, provider="cpu", verify="none")


def test_truncated_weights_file(copy):
    data = copy / I.DATA_FILE
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu")
    assert f"truncated {I.DATA_FILE}" in one_line(e) and "re-export or re-download" in str(e.value)


def test_sha256_mismatch(copy):
    data = copy / I.DATA_FILE
    with open(data, "r+b") as f:  # same size, one byte changed: only the hash can tell
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 0xFF]))
    runtime.load(copy, provider="cpu", verify="size")  # sizes still match
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu", verify="sha256")
    assert "sha256" in one_line(e) and I.DATA_FILE in str(e.value)


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / I.MANIFEST_FILE
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_newer_format_and_foreign_manifest(copy):
    _edit_manifest(copy, format_version=I.FORMAT_VERSION + 1)
    with pytest.raises(ArtifactVersionError) as e:
        runtime.load(copy, provider="cpu")
    assert "upgrade tablefree-onnx" in one_line(e)
    _edit_manifest(copy, format_version=I.FORMAT_VERSION, format="something-else")
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu")
    assert "something-else" in one_line(e)
    (copy / I.MANIFEST_FILE).unlink()
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu")
    assert I.MANIFEST_FILE in one_line(e)
    with pytest.raises(RuntimeArtifactError):
        runtime.load(copy / "nope", provider="cpu")


def test_cuda_demanded_without_cuda(tiny_artifacts):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is installed here")
    with pytest.raises(ProviderError) as e:
        runtime.load(tiny_artifacts("bitwise"), provider="cuda")
    assert "onnxruntime-gpu" in one_line(e)
    with pytest.raises(ProviderError):
        runtime.load(tiny_artifacts("bitwise"), provider="tpu")


def test_onnxruntime_not_installed(tiny_artifacts, tmp_path):
    fake = tmp_path / "fake" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    code = ("import runtime\n"
            f"try:\n    runtime.load({str(tiny_artifacts('bitwise'))!r})\n"
            "except runtime.MissingDependencyError as e:\n    print('OK', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]))
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("OK"), p.stderr
    assert "tablefree-onnx[cpu]" in p.stdout and "tablefree-onnx[gpu]" in p.stdout
    assert issubclass(MissingDependencyError, ImportError)


def test_cli_errors_are_one_line_exit_2(tiny_artifacts, copy, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    (copy / I.DATA_FILE).unlink()
    cases = [
        ["generate", "--model", str(tiny_artifacts("bitwise")), "--prompt", ""],
        ["generate", "--model", str(copy), "--prompt", "hi"],
        ["generate", "--model", str(tiny_artifacts("bitwise")), "--prompt", "hi", "--max-new-tokens", "100000", "--provider", "cpu"],
        ["generate", "--model", str(tiny_artifacts("bitwise")), "--prompt", "hi", "--top-p", "0", "--provider", "cpu"],
        ["score", "--model", str(tiny_artifacts("bitwise")), "--file", str(tmp_path / "missing.txt"), "--provider", "cpu"],
    ]
    for args in cases:
        p = subprocess.run([sys.executable, "-m", "runtime", *args], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stdout == ""
