"""Every public argument checked (types and ranges), table-driven: the exact error class, one line,
and no ONNX Runtime Run (nor, for load, a session) before the check."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.errors import ContextLengthError, InputError, ProviderError

ROOT = Path(__file__).resolve().parent.parent
V = 65_536  # the tiny checkpoints' vocabulary (asserted in the fixture)


@pytest.fixture(scope="module", params=["kv", "spec"])
def model(tiny_artifacts, request):
    m = runtime.load(tiny_artifacts("arith"), provider="cpu", graph=request.param)
    assert m.vocab_size == V
    m.forward(np.array([[1, 2]], np.int64))  # open model.onnx now: forward's checks need its dtype
    return m


@pytest.fixture
def runs(monkeypatch):
    """Count every ORT Run, on every session (both graphs): a rejected call must leave it at 0."""
    import onnxruntime as ort

    calls = []
    for name in ("run", "run_with_iobinding", "run_with_ort_values"):
        real = getattr(ort.InferenceSession, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(ort.InferenceSession, name, spy)
    return calls


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


NAN, INF = math.nan, math.inf
# (call, arguments, error class, a word the message must hold)
GENERATE_CASES = [
    ({"prompt": {"a": 1}}, InputError, "dict"),
    ({"prompt": b"hello"}, InputError, "bytes"),
    ({"prompt": bytearray(b"hi")}, InputError, "bytearray"),
    ({"prompt": None}, InputError, "NoneType"),
    ({"prompt": 7}, InputError, "int"),
    ({"prompt": 7.0}, InputError, "float"),
    ({"prompt": [True, False]}, InputError, "True"),
    ({"prompt": [1, True]}, InputError, "True"),
    ({"prompt": [1.0, 2.0]}, InputError, "1.0"),
    ({"prompt": [[[1, 2]]]}, InputError, "integer token ids"),
    ({"prompt": np.array([1.0, 2.0])}, InputError, "float64"),
    ({"prompt": np.array([True])}, InputError, "bool"),
    ({"prompt": "caf\udce9"}, InputError, "valid Unicode"),
    ({"prompt": "\ud800"}, InputError, "valid Unicode"),
    ({"prompt": ["fine", "bad \udcff"]}, InputError, "valid Unicode"),
    ({"prompt": ["fine", {"a": 1}]}, InputError, "prompt 1"),
    ({"prompt": ["fine", None]}, InputError, "prompt 1"),
    ({"prompt": [1, V]}, InputError, str(V)),
    ({"prompt": [-1]}, InputError, "-1"),
    ({"max_new_tokens": NAN}, InputError, "max_new_tokens"),
    ({"max_new_tokens": INF}, InputError, "max_new_tokens"),
    ({"max_new_tokens": None}, InputError, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, InputError, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, InputError, "max_new_tokens"),
    ({"max_new_tokens": "8"}, InputError, "max_new_tokens"),
    ({"max_new_tokens": True}, InputError, "max_new_tokens"),
    ({"max_new_tokens": -1}, InputError, "max_new_tokens"),
    ({"max_new_tokens": 0}, InputError, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, ContextLengthError, "max_new_tokens"),
    ({"min_new_tokens": -1}, InputError, "min_new_tokens"),
    ({"min_new_tokens": 1.5}, InputError, "min_new_tokens"),
    ({"min_new_tokens": 9}, InputError, "min_new_tokens"),
    ({"do_sample": True, "seed": -1}, InputError, "seed"),
    ({"do_sample": True, "seed": 1.5}, InputError, "seed"),
    ({"do_sample": True, "seed": "3"}, InputError, "seed"),
    ({"do_sample": True, "seed": True}, InputError, "seed"),
    ({"do_sample": True, "temperature": NAN}, InputError, "temperature"),
    ({"do_sample": True, "temperature": INF}, InputError, "temperature"),
    ({"do_sample": True, "temperature": -1.0}, InputError, "temperature"),
    ({"do_sample": True, "temperature": "1"}, InputError, "temperature"),
    ({"do_sample": True, "temperature": None}, InputError, "temperature"),
    ({"do_sample": True, "top_k": 2.5}, InputError, "top_k"),
    ({"do_sample": True, "top_k": -3}, InputError, "top_k"),
    ({"do_sample": True, "top_k": None}, InputError, "top_k"),
    ({"do_sample": True, "top_p": 0.0}, InputError, "top_p"),
    ({"do_sample": True, "top_p": 1.5}, InputError, "top_p"),
    ({"do_sample": True, "top_p": NAN}, InputError, "top_p"),
    ({"repetition_penalty": 0.0}, InputError, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, InputError, "repetition_penalty"),
    ({"repetition_penalty": INF}, InputError, "repetition_penalty"),
    ({"repetition_penalty": NAN}, InputError, "repetition_penalty"),
    ({"do_sample": "yes"}, InputError, "do_sample"),
    ({"do_sample": None}, InputError, "do_sample"),
    ({"stop": ""}, InputError, "empty stop"),
    ({"stop": {"a"}}, InputError, "stop"),
    ({"stop": [None]}, InputError, "stop"),
    ({"stop": [1.5]}, InputError, "stop"),
    ({"stop": ["ok", "\udcff"]}, InputError, "valid Unicode"),
    ({"stop": [V]}, InputError, str(V)),
]


@pytest.fixture
def built(tiny_artifacts) -> Path:
    """The tiny artifact, built before `no_session` forbids sessions (the builder's gate opens them)."""
    return tiny_artifacts("arith")


@pytest.mark.parametrize("kw,error,word", GENERATE_CASES, ids=[repr(c[0])[:60] for c in GENERATE_CASES])
def test_generate_and_stream_refuse_before_any_run(model, runs, kw, error, word):
    kw = {"prompt": "hello", "max_new_tokens": 4, **kw}
    with pytest.raises(error) as e:
        model.generate(**kw)
    assert type(e.value) is error and word in one_line(e)
    with pytest.raises(error) as e:
        model.stream(**kw)  # checked at the call, not at the first piece
    assert type(e.value) is error
    assert runs == []


@pytest.mark.parametrize("text,word", [(None, "NoneType"), (b"hello", "bytes"), ("caf\udce9", "valid Unicode"),
                                       ([True, 1], "True"), ([1, 2.0], "2.0"), ({"a": 1}, "dict"), ([1, V], str(V))])
def test_score_encode_decode_refuse(model, runs, text, word):
    with pytest.raises(InputError) as e:
        model.score(text)
    assert type(e.value) is InputError and word in one_line(e)
    if isinstance(text, (str, bytes)) or text is None:
        with pytest.raises(InputError):
            model.encode(text)
    with pytest.raises(InputError):
        model.decode([1, V])
    assert runs == []


def _past(model, lengths, dtype=np.float32, rank=4):
    H, hs = model.num_heads, model.head_size
    shapes = [(1, H, n, hs) for n in lengths]
    return [np.zeros(s if rank == 4 else s[1:], dtype) for s in shapes]


def test_forward_refuses_before_any_run(model, runs):
    L = model.num_layers
    ids = np.array([[1, 2, 3]], np.int64)
    cases = [
        (dict(past_key_values=_past(model, [2] * (2 * L - 1) + [3])), "different lengths"),
        (dict(past_key_values=_past(model, [2, 5] * L)), "different lengths"),
        (dict(past_key_values=_past(model, [2] * (2 * L), np.float16)), "float16"),
        (dict(past_key_values=_past(model, [2] * (2 * L), np.float64)), "float64"),
        (dict(past_key_values=_past(model, [2] * (2 * L), rank=3)), "shape"),
        (dict(past_key_values=np.zeros((2 * L, 1, model.num_heads, 2, model.head_size), np.float32)), "list"),
        (dict(past_key_values=[[0.0]] * (2 * L)), "list"),
        (dict(attention_mask=np.full((1, 3), 2, np.int64)), "0 (padding) and 1"),
        (dict(logits_to_keep=1.5), "logits_to_keep"),
        (dict(logits_to_keep=-1), "logits_to_keep"),
        (dict(logits_to_keep=True), "logits_to_keep"),
        (dict(input_ids=[[1.5, 2.0]]), "float64"),
        (dict(input_ids="abc"), "str"),
        (dict(input_ids=None), "NoneType"),
        (dict(input_ids=np.array([[1, V]], np.int64)), str(V)),
    ]
    for kw, word in cases:
        kw = {"input_ids": ids, **kw}
        with pytest.raises(InputError) as e:
            model.forward(**kw)
        assert type(e.value) is InputError and word in one_line(e), kw
    assert runs == []


@pytest.fixture
def no_session(monkeypatch):
    import onnxruntime as ort

    def boom(*a, **k):
        raise AssertionError("a session was created before the arguments were checked")

    monkeypatch.setattr(ort, "InferenceSession", boom)


@pytest.mark.parametrize("kw,error,word", [
    (dict(threads=0), InputError, "threads"),
    (dict(threads=-2), InputError, "threads"),
    (dict(threads=1.5), InputError, "threads"),
    (dict(threads="4"), InputError, "threads"),
    (dict(threads=True), InputError, "threads"),
    (dict(verify="md5"), InputError, "verify"),
    (dict(verify=None), InputError, "verify"),
    (dict(graph="shared"), InputError, "graph"),
    (dict(provider="tpu"), ProviderError, "provider"),
    (dict(folder=None), InputError, "folder"),
    (dict(folder=5), InputError, "folder"),
])
def test_load_arguments_refused_before_reading(built, no_session, kw, error, word):
    kw = {"folder": built, "provider": "cpu", **kw}
    with pytest.raises(error) as e:
        runtime.load(**kw)
    assert type(e.value) is error and word in one_line(e)


def _cli(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime", *args], env=env, cwd=tmp_path, capture_output=True, timeout=120)


@pytest.mark.parametrize("extra,word", [
    (["--seed", "-1"], "seed"),
    (["--threads", "0"], "threads"),
    (["--top-k", "-1"], "top_k"),
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--max-new-tokens", "-5"], "max_new_tokens"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
])
def test_cli_bad_arguments_are_one_line_exit_2(tiny_artifacts, tmp_path, extra, word):
    p = _cli(["generate", "--model", str(tiny_artifacts("arith")), "--prompt", "hi", "--provider", "cpu", *extra],
             tmp_path)
    err = p.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and word in lines[0] and "Traceback" not in err, err
    assert p.stdout == b""


def test_cli_prompt_of_invalid_utf8_bytes(tiny_artifacts, tmp_path):
    if sys.platform == "win32":
        pytest.skip("argv is text on Windows")
    p = _cli(["generate", "--model", str(tiny_artifacts("arith")), "--prompt", b"caf\xe9 \xff", "--provider", "cpu"],
             tmp_path)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2 and "valid Unicode" in err and "Traceback" not in err, err
