"""A checkpoint whose tokenizer is code in the folder (auto_map in tokenizer_config.json).

The oracle is the folder's own code run by transformers (tests/remote_tokenizer_ok/: characters,
merges and byte pieces, which a tokenizer.json can say exactly; tests/remote_tokenizer_lossy/: a
tokenizer that reads the text backwards, which no tokenizer.json can say). The exported
tokenizer.json is read with the `tokenizers` library alone, as the runtime does, and must give the
code's ids and text on the export's fixed test set and on seeded random strings it never saw.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from export.build import build  # noqa: E402
from export.remote_tokenizer import TEST_STRINGS, check_strings  # noqa: E402

HERE = Path(__file__).parent
OK_CODE, LOSSY_CODE = HERE / "remote_tokenizer_ok", HERE / "remote_tokenizer_lossy"
V = 512  # K 9: the code tokenizers use ids < 363


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny checkpoint without tokenizer files (d 36, 1 layer, V 512): exports in seconds."""
    from reference.config import CodeConfig, tiny_config
    from reference.factory import make_checkpoint
    from reference.lift import random_invertible_gf2

    A, b = random_invertible_gf2(9, seed=5)
    cfg = tiny_config(vocab_size=V, hidden_size=36, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      code=CodeConfig(bits=9, A=A, b=b))
    return make_checkpoint(tmp_path_factory.mktemp("tokw") / "ckpt", cfg, seed=2)


def with_code(weights: Path, code: Path, dest: Path) -> Path:
    shutil.copytree(weights, dest)
    for f in code.iterdir():
        if f.is_file():
            shutil.copy(f, dest / f.name)
    return dest


def folder_tokenizer(folder: Path):
    """The oracle: transformers running the folder's tokenizer code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)


def random_strings(n: int = 150) -> list[str]:
    """Seeded strings over ASCII, whitespace, the merges' letters, accents, CJK, Cyrillic and emoji."""
    rng = random.Random(2103)
    pool = list("the rth e") * 4 + [chr(c) for c in range(0x20, 0x7F)] + list("\n\t\r  éжЖ日本語ру👍🏽\u200d👩ा")
    return ["".join(rng.choices(pool, k=rng.randint(0, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def ok_export(tmp_path_factory, weights):
    root = tmp_path_factory.mktemp("tok_ok")
    folder = with_code(weights, OK_CODE, root / "ckpt")
    logs: list[str] = []
    out = build(folder, root / "art", trust_remote_code=True, kv_graph=False, log=logs.append)
    return folder, out, logs


@pytest.fixture(scope="module")
def lossy_export(tmp_path_factory, weights):
    root = tmp_path_factory.mktemp("tok_lossy")
    folder = with_code(weights, LOSSY_CODE, root / "ckpt")
    logs: list[str] = []
    out = build(folder, root / "art", trust_remote_code=True, kv_graph=False, log=logs.append)
    return folder, out, logs


def test_code_tokenizer_ships_as_a_tokenizer_json_equal_to_the_code(ok_export):
    from tokenizers import Tokenizer

    folder, out, logs = ok_export
    oracle = folder_tokenizer(folder)
    shipped = Tokenizer.from_file(str(out / "tokenizer.json"))
    strings = check_strings(oracle) + random_strings()
    assert set(TEST_STRINGS) <= set(strings) and "<s>" in strings and "" in strings
    for s in strings:
        ids = oracle(s)["input_ids"]
        assert shipped.encode(s).ids == ids, s
        assert shipped.decode(ids, skip_special_tokens=False) == oracle.decode(ids), s
        assert shipped.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True), s
    assert shipped.encode("the other").ids != [oracle.convert_tokens_to_ids(c) for c in "the other"]  # merges ran
    said = next(i for i, m in enumerate(logs) if "will run code from" in m)  # named before it runs
    assert "tokenization_charbpe.py" in logs[said]
    line = [m for m in logs if "[export] tokenizer:" in m]
    assert len(line) == 1 and logs.index(line[0]) > said and "ships as tokenizer.json" in line[0] and f"{len(check_strings(oracle))} test strings" in line[0]


def test_manifest_records_the_check(ok_export):
    folder, out, _ = ok_export
    tok = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tok["runs_on"] == "text" and tok["file"] == "tokenizer.json"
    assert tok["code"] == "tokenization_charbpe.CharBPETokenizer"
    assert tok["check"]["passed"] is True and tok["check"]["strings"] == len(check_strings(folder_tokenizer(folder)))
    assert tok["check"]["strings"] > len(TEST_STRINGS)  # the special tokens were checked too


def test_the_runtime_and_transformers_read_the_artifact_without_the_code(ok_export):
    """The artifact holds no code: its tokenizer_config.json no longer names the folder's class, so
    transformers (no trust_remote_code) and the runtime both read tokenizer.json and agree with the code."""
    from transformers import AutoTokenizer

    import runtime

    folder, out, _ = ok_export
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tc and tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not list(out.glob("*.py"))
    oracle = folder_tokenizer(folder)
    plain = AutoTokenizer.from_pretrained(str(out))
    m = runtime.load(out, provider="cpu")
    for s in TEST_STRINGS[:8] + ("<s>the end</s>",):
        ids = oracle(s)["input_ids"]
        assert plain(s)["input_ids"] == ids and m.encode(s) == ids, s
        assert m.decode(ids) == oracle.decode(ids)


def test_unconvertible_tokenizer_runs_on_ids_and_says_so(lossy_export):
    import runtime
    from runtime.errors import RuntimeArtifactError

    folder, out, logs = lossy_export
    assert not (out / "tokenizer.json").exists()
    line = [m for m in logs if "[export] tokenizer:" in m]
    assert len(line) == 1 and "\n" not in line[0], line
    assert "no exact tokenizer.json" in line[0] and repr(TEST_STRINGS[0]) in line[0] and "token ids only" in line[0]
    tok = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tok["runs_on"] == "ids" and tok["file"] is None and tok["check"]["passed"] is False
    assert tok["check"]["first_difference"] == TEST_STRINGS[0]
    assert tok["code"] == "tokenization_mirror.MirrorTokenizer" and "token ids only" in tok["reason"]
    m = runtime.load(out, provider="cpu")
    with pytest.raises(RuntimeArtifactError, match="runs on token ids only.*MirrorTokenizer"):
        m.generate("hello", max_new_tokens=2)
    ids = folder_tokenizer(folder)("hello")["input_ids"]
    assert 1 <= len(m.generate(ids, max_new_tokens=2).ids) <= 2


def test_without_the_flag_the_note_names_the_code_and_the_flag(tmp_path, weights):
    folder = with_code(weights, OK_CODE, tmp_path / "ckpt")
    logs: list[str] = []
    out = build(folder, tmp_path / "art", kv_graph=False, verify=False, log=logs.append)
    notes = [i for i, m in enumerate(logs) if "tokenizer exists only as code" in m]
    assert len(notes) == 1
    note = logs[notes[0]]
    assert "tokenization_charbpe.CharBPETokenizer" in note and "--trust-remote-code" in note and "token ids only" in note
    traced = next(i for i, m in enumerate(logs) if m.startswith("[export] model "))  # printed before the trace starts
    assert notes[0] < traced
    assert not (out / "tokenizer.json").exists()
    tok = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tok["runs_on"] == "ids" and "--trust-remote-code" in tok["reason"]
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())


FAST_CODE = '''from transformers import PreTrainedTokenizerFast


class BvvTokenizerFast(PreTrainedTokenizerFast):
    """A fast tokenizer class of the folder's own, over its tokenizer.json."""
'''


def test_a_fast_tokenizer_class_ships_its_own_backend(tmp_path, bvv241_dir):
    """A PreTrainedTokenizerFast subclass in the folder's code: its backend_tokenizer is the candidate,
    and it ships only after the same check (the committed bvv241 tokenizer.json under a code class)."""
    from tokenizers import Tokenizer

    from export.remote_tokenizer import convert

    folder = tmp_path / "fast"
    folder.mkdir()
    shutil.copy(bvv241_dir / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenization_bvvfast.py").write_text(FAST_CODE)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BvvTokenizerFast", "unk_token": "<unk>",
        "auto_map": {"AutoTokenizer": [None, "tokenization_bvvfast.BvvTokenizerFast"]}}))
    logs: list[str] = []
    got = convert(folder, 65536, logs.append)
    assert got.converter == "backend_tokenizer" and got.runs_on == "text" and len(logs) == 1
    oracle, shipped = folder_tokenizer(folder), Tokenizer.from_str(got.tokenizer_json)
    for s in check_strings(oracle) + random_strings(50):
        ids = oracle(s)["input_ids"]
        assert shipped.encode(s).ids == ids and shipped.decode(ids, skip_special_tokens=False) == oracle.decode(ids), s
