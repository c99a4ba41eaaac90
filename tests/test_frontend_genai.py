"""onnxruntime-genai runs the artifact from text: its tokenizer against `tokenizers`, its greedy text
and tokens against the project's runtime, on model.onnx and on the shared-buffer variant.

genai lives in its own venv (`make setup-genai`); see tests/frontends/shared.py.
"""
from __future__ import annotations

import json

import pytest

from frontends.shared import (MAX_NEW, PROMPTS, ROOT, demo_artifact, run_script,
                              runtime_greedy, venv_python, write_json)

# The fixed test set: ASCII, runs of spaces and newlines, punctuation, non-Latin scripts, emoji
# (no token: one <unk> per character), private-use and noncharacters, special tokens in the text.
TEXTS = [
    "ROMEO:", "hello the test", "Hello, world! How are you?", "  two  spaces   and\nnew\n\nlines\r\n\ttab ",
    "It's -- (quoted) \"text\"; 3.14 + 2 = 5.14? [ok] {x: 1} <tag> a/b \\ ~!@#$%^&*_=|`",
    "Привет, как дела? Всё хорошо.", "中文分词测试，以及日本語のテキスト。", "مرحبا بالعالم", "नमस्ते दुनिया",
    "Größere Äpfel schmecken süß.", "한국어 문장입니다.", "Καλημέρα κόσμε", "שלום עולם", "Tiếng Việt có dấu",
    "emoji 😀👍🏽 and 🇺🇸!", "a\uffffb\ue000c", "<s>ROMEO:</s> <pad>", "", " ", "\n",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n",
]
SPEC_VECTOR = ("hello the test", [104, 56035, 111, 32, 57811, 32, 116, 56117])


def _round_trips(text: str, row: dict) -> bool:
    unk_or_special = any(i >= 0xE000 and i < 0xE100 for i in row["genai"]) or "\u2581" in text
    return unk_or_special or row["genai_decoded"] == text


def _check_tokenizer(py, folder, original_json, tmp_path, texts):
    out = run_script(py, "genai_tokenizer.py", folder, write_json(tmp_path / "texts.json", texts), original_json)
    assert len(out["rows"]) == len(texts)
    for row in out["rows"]:
        t = row["text"]
        assert row["tokenizers"] == row["original"], f"the shipped tokenizer.json encodes {t!r} differently from the source"
        assert row["genai"] == row["tokenizers"], f"genai encodes {t!r} as {row['genai']}, tokenizers as {row['tokenizers']}"
        assert _round_trips(t, row), f"genai decodes {t!r} back as {row['genai_decoded']!r}"
    return out["rows"]


def test_genai_form_keeps_tokenizers_encoding():
    """The genai form encodes and decodes exactly as the source file in `tokenizers` (no genai needed):
    random strings over an alphabet of the characters the form rewrites (' ', '\u2581', U+FFFF,
    U+10FFFF), characters without a token, letters that merge, and the texts of the test set."""
    import random

    from tokenizers import Tokenizer

    from export.tokenizer_files import genai_tokenizer_json

    src = (ROOT / "models" / "shakespeare" / "tokenizer.json").read_text(encoding="utf-8")
    before = Tokenizer.from_str(src)
    after = Tokenizer.from_str(json.dumps(genai_tokenizer_json(json.loads(src), 65536)))
    alphabet = list(" \u2581\uffff\U0010ffff\ue000😀\n\teortahisnTHE:,.!'") + ["the ", "ROMEO", "<s>", "</s>"]
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    for t in texts:
        ids = before.encode(t, add_special_tokens=False).ids
        assert after.encode(t, add_special_tokens=False).ids == ids, f"the genai form encodes {t!r} differently"
        assert after.decode(ids) == before.decode(ids), f"the genai form decodes the ids of {t!r} differently"
    assert after.decode([32, 9601, 32]) == " \u2581 "


@pytest.fixture(scope="module")
def genai_py():
    return venv_python("genai")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return demo_artifact(tmp_path_factory, "arith")


def test_genai_tokenizer_equals_tokenizers(genai_py, shipped, tmp_path_factory, tmp_path):
    original = ROOT / "models" / "shakespeare" / "tokenizer.json"  # the source checkpoint's form
    rows = _check_tokenizer(genai_py, shipped, original, tmp_path, TEXTS)
    by_text = {r["text"]: r["genai"] for r in rows}
    assert by_text["ROMEO:"] == [55841, 55712]  # the example: genai gave [58002, 55797, 58]
    assert by_text["emoji 😀👍🏽 and 🇺🇸!"].count(57347) == 5  # one <unk> per code point above U+FFFF


def test_genai_tokenizer_bvv241(genai_py, bvv241_dir, shipped, tmp_path):
    """The real 65,536-token tokenizer (SPEC 4), with its test vector, in the genai form."""
    import shutil

    from export.tokenizer_files import write_genai_tokenizer

    folder = tmp_path / "bvv241"
    shutil.copytree(shipped, folder, symlinks=True, ignore=shutil.ignore_patterns("tokenizer*.json"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(bvv241_dir / name, folder / name)
    assert write_genai_tokenizer(folder, 65536)
    rows = _check_tokenizer(genai_py, folder, bvv241_dir / "tokenizer.json", tmp_path, TEXTS + [SPEC_VECTOR[0]])
    assert rows[-1]["genai"] == SPEC_VECTOR[1]


def _check_generation(genai_py, folder, artifact, tmp_path):
    expected = runtime_greedy(artifact)
    out = run_script(genai_py, "genai_generate.py", folder, write_json(tmp_path / "prompts.json", PROMPTS), MAX_NEW)
    for want, got in zip(expected, out["rows"]):
        assert got["prompt_ids"] == want.prompt_ids, f"genai's tokenizer split {got['prompt']!r} differently"
        assert got["ids"] == want.ids, f"genai's greedy tokens differ for {got['prompt']!r}"
        assert got["text"] == want.text and got["decoded"] == want.text, f"genai's text differs for {got['prompt']!r}"


MODES = ["arith", pytest.param("bitwise", marks=pytest.mark.slow), pytest.param("lookup", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode", MODES)
def test_genai_generates_runtime_text(genai_py, tmp_path_factory, tmp_path, mode):
    """The folder as shipped: genai_config.json runs model.genai.onnx with one shared cache buffer per
    layer; genai's text from text equals the runtime's."""
    artifact = demo_artifact(tmp_path_factory, mode)
    cfg = json.loads((artifact / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is True
    assert cfg["model"]["decoder"]["filename"] == "model.genai.onnx"
    _check_generation(genai_py, artifact, artifact, tmp_path)


def test_verify_genai_kv_teacher_forcing(shipped):
    """export/verify_genai.py (the gate's check, plain onnxruntime, no genai): model.genai.onnx fed as
    genai feeds it gives model.onnx's full-sequence logits at every position, and a wrong
    expectation is reported."""
    import numpy as np
    import onnxruntime as ort

    from export.verify_genai import GenaiKvMismatch, check_genai_kv

    ids = [55841, 55712, 10, 55342, 100, 55534, 58571, 55548, 101, 56944, 55437, 100, 55548, 101]
    cfg = json.loads((shipped / "config.json").read_text())
    sess = ort.InferenceSession(str(shipped / "model.onnx"), providers=["CPUExecutionProvider"])
    n, heads, hs = len(ids), cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None]}
    for i in range(cfg["num_hidden_layers"]):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, heads, 0, hs), np.float32)
    expected = sess.run(["logits"], feed)[0][0]
    tol = 1e-4 * float(np.abs(expected).max())
    assert check_genai_kv(shipped, ids, expected, tol, prompt_len=3) <= tol
    wrong = expected.copy()
    wrong[7, 0] += 1.0
    with pytest.raises(GenaiKvMismatch, match="position 7"):
        check_genai_kv(shipped, ids, wrong, tol, prompt_len=3)
