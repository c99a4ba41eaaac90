"""Integrity by default: a byte flipped in any file of an artifact, a file the manifest does not
vouch for, and config.json disagreeing with the graphs are refused at load, before ONNX Runtime
opens a session; the verified-stamp cache spares repeated loads the hashing but not a changed file."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import runtime
import runtime.integrity as integrity
from runtime import interface as I
from runtime.artifact import READ_FILES
from runtime.errors import RuntimeArtifactError


@pytest.fixture
def copy(tiny_artifacts, tmp_path):
    dst = tmp_path / "artifact"
    shutil.copytree(tiny_artifacts("arith"), dst)
    return dst


@pytest.fixture
def stamps(tmp_path, monkeypatch) -> Path:
    """A fresh, empty stamp cache for this test."""
    folder = tmp_path / "stamps"
    monkeypatch.setenv("TABLEFREE_CACHE", str(folder))
    return folder


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Names of the files hashed during the test."""
    seen: list[str] = []
    real = integrity.sha256_file

    def counting(path, *a, **k):
        seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    return seen


@pytest.fixture
def no_session(monkeypatch):
    import onnxruntime as ort

    def boom(*a, **k):
        raise AssertionError("ONNX Runtime opened a session on a folder that should have been refused")

    monkeypatch.setattr(ort, "InferenceSession", boom)


def flip(path: Path, offset: int) -> None:
    """Same size, one byte changed: only a hash can tell."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def _manifest(folder: Path) -> dict:
    return json.loads((folder / I.MANIFEST_FILE).read_text())


def _write_manifest(folder: Path, m: dict) -> None:
    (folder / I.MANIFEST_FILE).write_text(json.dumps(m))


@pytest.fixture
def built(tiny_artifacts) -> Path:
    """The tiny artifact, built before `no_session` forbids sessions (the builder's gate opens them)."""
    return tiny_artifacts("arith")


def test_default_load_refuses_a_byte_flip_in_every_file(built, tmp_path, stamps, no_session):
    src = built
    names = sorted(_manifest(src)["files"])
    assert set(READ_FILES) <= set(names) | {I.GENERATION_CONFIG_FILE}
    on_disk = sorted(p.name for p in src.iterdir() if p.name != I.MANIFEST_FILE)
    assert names == on_disk, "the exporter lists every file it writes"
    for name in names:
        for where in ("start", "middle", "end"):
            dst = tmp_path / f"{name}-{where}"
            shutil.copytree(src, dst)
            size = (dst / name).stat().st_size
            flip(dst / name, {"start": 0, "middle": size // 2, "end": size - 1}[where])
            with pytest.raises(RuntimeArtifactError) as e:
                runtime.load(dst, provider="cpu")
            assert name in one_line(e) and "sha256" in str(e.value), (name, where)
            shutil.rmtree(dst)


def test_manifest_must_vouch_for_every_file_the_runtime_reads(copy, stamps, no_session):
    original = _manifest(copy)
    for name in READ_FILES:
        if name not in original["files"]:
            continue
        for how in ("dropped", "empty sha256", "no sha256", "short sha256"):
            m = json.loads(json.dumps(original))
            if how == "dropped":
                del m["files"][name]
            elif how == "empty sha256":
                m["files"][name]["sha256"] = ""
            elif how == "no sha256":
                del m["files"][name]["sha256"]
            else:
                m["files"][name]["sha256"] = m["files"][name]["sha256"][:10]
            _write_manifest(copy, m)
            with pytest.raises(RuntimeArtifactError) as e:
                runtime.load(copy, provider="cpu")
            assert name in one_line(e) and "re-export" in str(e.value), (name, how)
    _write_manifest(copy, original)


def test_verify_none_and_size_stay_for_those_who_ask(copy, stamps):
    flip(copy / I.DATA_FILE, 100)
    with pytest.raises(RuntimeArtifactError):
        runtime.load(copy, provider="cpu")
    runtime.load(copy, provider="cpu", verify="size")
    m = _manifest(copy)
    m["files"][I.DATA_FILE]["sha256"] = ""
    _write_manifest(copy, m)
    with pytest.raises(RuntimeArtifactError):
        runtime.load(copy, provider="cpu", verify="size")  # the listing is checked with sizes too
    runtime.load(copy, provider="cpu", verify="none")


def test_stamp_cache_skips_rehashing_but_not_a_changed_file(copy, stamps, hashes):
    listed = sorted(_manifest(copy)["files"])
    before = sorted(p.name for p in copy.iterdir())
    runtime.load(copy, provider="cpu")
    assert sorted(hashes) == listed  # the first load hashes every listed file
    assert sorted(p.name for p in copy.iterdir()) == before, "nothing is written into the artifact folder"
    assert [p.name for p in stamps.iterdir()] == [integrity.STAMP_FILE]
    hashes.clear()
    runtime.load(copy, provider="cpu")
    assert hashes == []  # the second load: stamps only
    # same size, new content, mtime moved on: re-hashed and refused
    data = copy / I.DATA_FILE
    st = data.stat()
    flip(data, st.st_size // 3)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu")
    assert I.DATA_FILE in one_line(e) and hashes == [I.DATA_FILE]
    # the mtime set back to the old one: the ctime still moved, so it is hashed again
    flip(data, st.st_size // 3)  # the original bytes again...
    flip(data, st.st_size // 4)  # ...and a new change
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    hashes.clear()
    with pytest.raises(RuntimeArtifactError):
        runtime.load(copy, provider="cpu")
    assert hashes == [I.DATA_FILE]


def test_a_corrupt_stamp_cache_is_ignored(copy, stamps, hashes):
    stamps.mkdir()
    (stamps / integrity.STAMP_FILE).write_text("{not json")
    runtime.load(copy, provider="cpu")
    assert len(hashes) == len(_manifest(copy)["files"])
    json.loads((stamps / integrity.STAMP_FILE).read_text())  # rewritten whole
    (stamps / integrity.STAMP_FILE).write_text(json.dumps({str(copy / I.DATA_FILE): {"stamp": "x", "sha256": 5}}))
    hashes.clear()
    runtime.load(copy, provider="cpu")
    assert I.DATA_FILE in hashes


def test_stamp_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("TABLEFREE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert integrity.cache_dir() == tmp_path / "xdg" / "tablefree-onnx"
    monkeypatch.setenv("TABLEFREE_CACHE", str(tmp_path / "mine"))
    assert integrity.cache_dir() == tmp_path / "mine"


def _edit_config(folder: Path, **changes) -> None:
    """A consistent edit: config.json changed and the manifest's hash and size updated, as a careless
    hand edit that also 'fixed' the manifest would do; only the graphs can tell."""
    path = folder / I.CONFIG_FILE
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
    m = _manifest(folder)
    data = path.read_bytes()
    m["files"][I.CONFIG_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _write_manifest(folder, m)


@pytest.mark.parametrize("field,delta", [("num_hidden_layers", 1), ("num_hidden_layers", -1),
                                         ("num_attention_heads", "x2"), ("hidden_size", "x2"),
                                         ("vocab_size", -1), ("max_position_embeddings", 1),
                                         ("max_position_embeddings", -1)])
def test_config_checked_against_the_graphs(copy, stamps, field, delta):
    cfg = json.loads((copy / I.CONFIG_FILE).read_text())
    value = cfg[field] * 2 if delta == "x2" else cfg[field] + delta
    _edit_config(copy, **{field: value})
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu")
    msg = one_line(e)
    assert field in msg or (field == "hidden_size" and "hidden_size" in msg), msg
    assert "re-export" in msg


@pytest.mark.parametrize("field", ["num_hidden_layers", "num_attention_heads", "vocab_size"])
def test_config_checked_against_model_onnx_too(copy, stamps, field):
    cfg = json.loads((copy / I.CONFIG_FILE).read_text())
    _edit_config(copy, **{field: cfg[field] * 2})
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu", graph="spec")
    assert field in one_line(e)


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "8", None])
def test_config_values_must_be_positive_integers(copy, stamps, value):
    _edit_config(copy, num_attention_heads=value)
    with pytest.raises(RuntimeArtifactError) as e:
        runtime.load(copy, provider="cpu")
    assert "num_attention_heads" in one_line(e)
