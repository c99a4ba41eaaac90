"""Checkpoint folders the reader must refuse (issue 11, items 3 and 4), one table row per case.

Each row damages a fresh copy of a small valid checkpoint and asserts: `load_checkpoint` raises
exactly `CheckpointError`, with a one-line message naming the file and the field or tensor, and
the folder is left as it was (same files, links, sizes and mtimes). A few rows also go through
`python -m export build`: exit status 2, one `error:` line, no traceback, no --out. The oracle for
"well-formed" is the safetensors format as its specification states it, rewritten here by hand.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from reference.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "model.safetensors"


# -- hand-written safetensors edits (the small checkpoint is tests/conftest.py's small_ckpt) ---------------------------------------
def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_file(path: Path, header, data: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def edit_header(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """A row's damage: fn(header) edits the header in place (or returns a replacement)."""
    def apply(folder: Path) -> None:
        header, data = split_file(folder / WEIGHTS)
        new = fn(header)
        write_file(folder / WEIGHTS, header if new is None else new, data)
    return apply


def edit_json(name: str, **fields) -> Callable[[Path], None]:
    """Set (or with the value DELETE remove) fields of a JSON file; "code.scale" reaches into code."""
    def apply(folder: Path) -> None:
        d = json.loads((folder / name).read_text())
        for key, value in fields.items():
            target, _, leaf = key.replace("__", ".").rpartition(".")
            obj = d[target] if target else d
            obj[leaf] = value
        (folder / name).write_text(json.dumps(d))  # allow_nan: NaN and Infinity as Python writes them
    return apply


def write_raw(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def symlink(name: str, target: str | Callable[[Path], str]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        os.symlink(target(folder) if callable(target) else target, folder / name)
    return apply


def outside_file(folder: Path) -> str:
    secret = folder.parent / "secret.txt"
    secret.write_text("not for the artifact\n")
    return str(secret)


def shard_index(shard: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        header, _ = split_file(folder / WEIGHTS)
        weight_map = {k: WEIGHTS for k in header if k != "__metadata__"}
        weight_map["lm_head.weight"] = shard
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return apply


def poison(tensor: str, value: float) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        header, data = split_file(folder / WEIGHTS)
        begin = header[tensor]["data_offsets"][0]
        data = data[:begin + 8] + np.array([value], dtype=np.float32).tobytes() + data[begin + 12:]
        write_file(folder / WEIGHTS, header, data)
    return apply


def entry(name: str, **fields) -> Callable[[dict], None]:
    return lambda h: h[name].update(fields)


def overlap(h: dict) -> None:
    h["layers.0.ln2.weight"]["data_offsets"] = list(h["layers.0.ln1.weight"]["data_offsets"])


LN = "layers.0.ln1.weight"
DELETE = object()

# (id, damage, words the one line must contain: the file, then the field or tensor)
CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    # safetensors headers
    ("header-length-past-eof", lambda f: write_file(f / WEIGHTS, *split_file(f / WEIGHTS), length=1 << 40), (WEIGHTS, "header length")),
    ("file-too-short", write_raw(WEIGHTS, b"\x01\x00"), (WEIGHTS, "truncated")),
    ("header-not-json", lambda f: write_file(f / WEIGHTS, b"{not json" + b" " * 8, split_file(f / WEIGHTS)[1]), (WEIGHTS, "JSON")),
    ("header-not-utf8", lambda f: write_file(f / WEIGHTS, b'{"\xff": 1}', split_file(f / WEIGHTS)[1]), (WEIGHTS, "UTF-8")),
    ("header-is-list", edit_header(lambda h: [h]), (WEIGHTS, "list")),
    ("entry-is-string", edit_header(lambda h: h.update({LN: "F32"})), (WEIGHTS, LN, "str")),
    ("entry-no-dtype", edit_header(lambda h: h[LN].pop("dtype") and None), (WEIGHTS, LN, "dtype")),
    ("unknown-dtype", edit_header(entry(LN, dtype="F8_E4M3")), (WEIGHTS, LN, "F8_E4M3")),
    ("shape-negative", edit_header(entry(LN, shape=[-32])), (WEIGHTS, LN, "shape")),
    ("shape-bool", edit_header(entry(LN, shape=[True])), (WEIGHTS, LN, "shape")),
    ("offsets-strings", edit_header(entry(LN, data_offsets=["0", "128"])), (WEIGHTS, LN, "data_offsets")),
    ("offsets-one-int", edit_header(entry(LN, data_offsets=[0])), (WEIGHTS, LN, "data_offsets")),
    ("offsets-negative", edit_header(entry(LN, data_offsets=[-256, 0])), (WEIGHTS, LN, "data_offsets")),
    ("offsets-reversed", edit_header(entry(LN, data_offsets=[128, 0])), (WEIGHTS, LN, "data_offsets")),
    ("offsets-past-data", edit_header(entry(LN, data_offsets=[1 << 30, (1 << 30) + 128])), (WEIGHTS, LN, "data_offsets")),
    ("span-not-shape", edit_header(entry(LN, shape=[31])), (WEIGHTS, LN, "shape")),
    ("offsets-overlap", edit_header(overlap), (WEIGHTS, "overlaps")),
    ("metadata-not-object", edit_header(lambda h: h.update({"__metadata__": ["pt"]})), (WEIGHTS, "__metadata__")),
    # index shards and symlinks
    ("shard-parent-dir", lambda f: (shutil.copy(f / WEIGHTS, f.parent / WEIGHTS), shard_index("../model.safetensors")(f)),
     ("../model.safetensors", "outside")),
    ("shard-absolute", shard_index("/etc/hostname"), ("/etc/hostname", "outside")),
    ("shard-link-out", lambda f: (shutil.copy(f / WEIGHTS, f.parent / "elsewhere.safetensors"),
                                  os.replace(f / WEIGHTS, f / "real.safetensors"),
                                  symlink(WEIGHTS, str(f.parent / "elsewhere.safetensors"))(f)), (WEIGHTS, "outside")),
    ("weights-loop", symlink(WEIGHTS, WEIGHTS), (WEIGHTS, "loop")),
    ("config-loop", symlink("config.json", "config.json"), ("config.json", "loop")),
    ("config-dangling", symlink("config.json", "nowhere.json"), ("config.json", "does not exist")),
    ("tokenizer-link-out", symlink("special_tokens_map.json", outside_file), ("special_tokens_map.json", "outside")),
    ("tokenizer-loop", symlink("tokenizer.json", "tokenizer.json"), ("tokenizer.json", "loop")),
    # config.json
    ("config-not-utf8", write_raw("config.json", b'{"vocab_size": "\xff"}'), ("config.json", "UTF-8")),
    ("config-is-list", write_raw("config.json", b"[1, 2]"), ("config.json", "list")),
    ("vocab-float", edit_json("config.json", vocab_size=256.0), ("config.json", "vocab_size", "integer")),
    ("hidden-string", edit_json("config.json", hidden_size="32"), ("config.json", "hidden_size", "integer")),
    ("layers-bool", edit_json("config.json", num_hidden_layers=True), ("config.json", "num_hidden_layers", "integer")),
    ("heads-zero", edit_json("config.json", num_attention_heads=0), ("config.json", "num_attention_heads")),
    ("heads-not-dividing", edit_json("config.json", num_attention_heads=3), ("config.json", "num_attention_heads")),
    ("eps-negative", edit_json("config.json", layer_norm_eps=-1), ("config.json", "layer_norm_eps", "> 0")),
    ("eps-nan", edit_json("config.json", layer_norm_eps=math.nan), ("config.json", "layer_norm_eps")),
    ("rope-theta-zero", edit_json("config.json", rope_theta=0), ("config.json", "rope_theta", "> 0")),
    ("context-zero", edit_json("config.json", max_position_embeddings=0), ("config.json", "max_position_embeddings")),
    ("scale-nan", edit_json("config.json", code__scale=math.nan), ("config.json", "code.scale")),
    ("scale-inf", edit_json("config.json", code__scale=math.inf), ("config.json", "code.scale")),
    ("scale-zero", edit_json("config.json", code__scale=0), ("config.json", "code.scale")),
    ("code-not-object", edit_json("config.json", code=[8]), ("config.json", "code")),
    ("bos-out-of-vocab", edit_json("config.json", bos_token_id=256), ("config.json", "bos_token_id")),
    # generation_config.json
    ("genconfig-not-json", write_raw("generation_config.json", b"{oops"), ("generation_config.json", "JSON")),
    ("genconfig-eos-string", edit_json("generation_config.json", eos_token_id="2"), ("generation_config.json", "eos_token_id")),
    ("genconfig-top-p", edit_json("generation_config.json", top_p=2.0), ("generation_config.json", "top_p")),
    # weights
    ("weight-nan", poison("layers.0.mlp.up_proj.weight", math.nan), (WEIGHTS, "layers.0.mlp.up_proj.weight", "NaN")),
    ("weight-inf", poison("lm_head.weight", math.inf), (WEIGHTS, "lm_head.weight", "Inf")),
]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry of the folder as (kind, size, mtime_ns, link target): what 'nothing written' means."""
    out = {}
    for p in sorted(folder.parent.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder.parent))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                  os.readlink(p) if p.is_symlink() else None)
    return out


def damaged(small_ckpt: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, folder)
    damage(folder)
    return folder


def test_the_small_checkpoint_loads(small_ckpt):
    cfg, sd = load_checkpoint(small_ckpt)
    assert cfg.vocab_size == 256 and sd["lm_head.weight"].shape == (256, 32)


def test_metadata_entry_is_allowed(small_ckpt, tmp_path):
    folder = damaged(small_ckpt, tmp_path, edit_header(lambda h: h.update({"__metadata__": {"format": "pt", "x": "y"}})))
    load_checkpoint(folder)


@pytest.mark.parametrize("case,damage,words", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line_and_nothing_written(small_ckpt, tmp_path, case, damage, words):
    folder = damaged(small_ckpt, tmp_path, damage)
    before = snapshot(folder)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert type(err.value) is CheckpointError
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600, msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert snapshot(folder) == before


@pytest.mark.parametrize("as_file", [False, True])
def test_key_map_with_invalid_regex_names_key_and_file(small_ckpt, tmp_path, as_file):
    key_map = {"transformer.h.(\\d+.ln_1.weight": "layers.\\1.ln1.weight"}
    source = key_map
    if as_file:
        source = tmp_path / "map.json"
        source.write_text(json.dumps(key_map))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(small_ckpt, key_map=source)
    msg = str(err.value)
    assert "transformer.h.(" in msg and "regular expression" in msg and "\n" not in msg
    assert (str(source) in msg) if as_file else msg.startswith("key map:")


def test_key_map_values_checked_alike_for_dict_and_file(small_ckpt, tmp_path):
    bad = {"x": 3}
    (tmp_path / "map.json").write_text(json.dumps(bad))
    for source in (bad, tmp_path / "map.json"):
        with pytest.raises(CheckpointError, match="canonical name or null"):
            load_checkpoint(small_ckpt, key_map=source)


def test_inside_folder_allows_links_within_the_folder(small_ckpt, tmp_path):
    folder = damaged(small_ckpt, tmp_path, lambda f: (os.replace(f / WEIGHTS, f / "w.bin.safetensors"),
                                                      os.symlink("w.bin.safetensors", f / WEIGHTS)))
    cfg, _ = load_checkpoint(folder)
    assert cfg.hidden_size == 32


# -- the same refusals through the CLI, before any tracing ------------------------------------------
CLI_CASES = ["offsets-negative", "heads-zero", "weight-nan", "tokenizer-link-out", "eps-negative"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "export", "build", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_before_tracing(small_ckpt, tmp_path, case):
    damage, words = next((d, w) for c, d, w in CASES if c == case)
    folder = damaged(small_ckpt, tmp_path, damage)
    before = snapshot(folder)
    out = tmp_path / "art"
    res = cli("--model", str(folder), "--out", str(out), "--code", "arith")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert all(w.lower() in errors[0].lower() for w in words), errors[0]
    assert "trace" not in res.stderr.replace(errors[0], "")  # no stage after load ran
    assert not out.exists() and not list(tmp_path.glob(".art.*"))
    assert snapshot(folder) == before


def test_cli_refuses_invalid_key_map_regex(small_ckpt, tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"a(b": "ln_f.weight"}))
    out = tmp_path / "art"
    res = cli("--model", str(small_ckpt), "--out", str(out), "--key-map", str(tmp_path / "map.json"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "map.json" in errors[0] and "a(b" in errors[0], res.stderr
    assert not out.exists()


def test_hub_cache_layout_links_into_blobs_are_inside(small_ckpt, tmp_path):
    """huggingface_hub's cache: snapshots/REV/FILE -> ../../blobs/HASH; the repository folder is the root."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, p in enumerate(sorted(small_ckpt.iterdir())):
        shutil.copy(p, blobs / f"h{i}")
        os.symlink(f"../../blobs/h{i}", snap / p.name)
    cfg, _ = load_checkpoint(snap)
    assert cfg.vocab_size == 256
    os.symlink(outside_file(repo), snap / "tokenizer.json")  # beside the repository folder: outside
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(snap)


@pytest.mark.parametrize("name,text,words", [
    ("tokenizer_config.json", "{not json", ("tokenizer_config.json", "json")),
    ("tokenizer_config.json", "[1, 2]", ("tokenizer_config.json", "object")),
    ("chat_template.json", "{\"chat_template\": ", ("chat_template.json", "chat template")),
    ("chat_template.jinja", b"\xff\xfe{{ bad", ("chat_template.jinja", "chat template")),
])
def test_cli_refuses_broken_tokenizer_files_before_tracing(small_ckpt, tmp_path, name, text, words):
    """Files the exporter copies into the artifact are read in the load stage, not after the gate."""
    folder = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, folder)
    (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(folder)
    out = tmp_path / "art"
    res = cli("--model", str(folder), "--out", str(out), "--code", "arith")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), res.stderr
    assert "trace" not in res.stderr.replace(errors[0], "")
    assert not out.exists() and snapshot(folder) == before
