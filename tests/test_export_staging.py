"""The exporter never destroys its input and never leaves its staging folders behind (issue 11).

Oracles: the folder's bytes before and after, the directory listing beside --out, the process
table (/proc) for the trace child, and the exit status and stderr of the real CLI. The builds here
use the embedded demo model (models/shakespeare, in the repository), so nothing needs data from outside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.build import build
from export.errors import ExportError
from export.remote import remote_code_files
from export.writer import ArtifactWriter, remove_stale
from reference.data import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
LINUX = sys.platform.startswith("linux")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_checkpoint(folder: Path) -> Path:
    """A folder the refusal must protect; it is never read, so it need not be a real checkpoint."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 65536}))
    (folder / "model.safetensors").write_bytes(b"weights that must survive")
    return folder


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", "build", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def siblings(out: Path) -> list[str]:
    """Everything a build of `out` made beside it (staging, work, old, probe folders)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_out_that_is_in_or_around_the_model_is_refused_and_nothing_deleted(tmp_path, where):
    model = fake_checkpoint(tmp_path / "ckpt")
    out = {"same": model, "inside": model / "artifact", "around": tmp_path}[where]
    before = snapshot(tmp_path)
    r = cli("--model", str(model), "--out", str(out), "--force")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out") and "model folder" in lines[0], r.stderr
    assert snapshot(tmp_path) == before


def test_out_equal_to_the_model_refused_by_the_api_too(tmp_path):
    model = fake_checkpoint(tmp_path / "ckpt")
    before = snapshot(model)
    with pytest.raises(ExportError, match="is the model folder"):
        build(model, model, force=True, log=lambda m: None)
    with pytest.raises(ExportError, match="is the model folder"):  # a path spelled differently
        build(model, tmp_path / "ckpt" / ".." / "ckpt", force=True, log=lambda m: None)
    assert snapshot(model) == before


def test_stale_staging_of_a_dead_build_is_removed_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "art"
    dead, live = dead_pid(), os.getppid()  # the pytest runner's parent is alive for the whole test
    for kind in ("tmp", "work", "old"):
        (tmp_path / f".art.{kind}-{dead}").mkdir()
        (tmp_path / f".art.{kind}-{dead}" / "model.onnx.data").write_bytes(b"x" * 100)
    (tmp_path / f".art.probe-{dead}").write_bytes(b"")
    (tmp_path / f".art.tmp-{live}").mkdir()
    (tmp_path / ".other.tmp-1").mkdir()  # another --out's: not ours to judge
    with ArtifactWriter(out) as w:
        assert siblings(out) == sorted([f".art.tmp-{live}", w.folder.name, w.work.name])
    assert siblings(out) == [f".art.tmp-{live}"]  # the writer's own folders went on exit
    assert (tmp_path / ".other.tmp-1").is_dir()
    assert remove_stale(out) == []


def test_writer_removes_its_folders_on_an_exception(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError), ArtifactWriter(out) as w:
        w.write_json("config.json", {})
        raise RuntimeError("boom")
    assert siblings(out) == [] and not out.exists()


def test_writer_hashes_what_it_wrote_and_refuses_strays(tmp_path):
    with ArtifactWriter(tmp_path / "art") as w:
        w.write_json("config.json", {"a": 1})
        w.write_bytes("tokenizer.json", b"{}")
        m = w.write_manifest({"format": "x"})
        assert set(m["files"]) == {"config.json", "tokenizer.json"}
        assert m["files"]["tokenizer.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()
        (w.folder / "stray.bin").write_bytes(b"")
        with pytest.raises(ExportError, match="stray.bin"):
            w.write_manifest({})
        (w.folder / "stray.bin").unlink()
        w.commit()
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["config.json", "manifest.json", "tokenizer.json"]
    assert siblings(tmp_path / "art") == []


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _start_build(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "export", "build", "--code", "arith", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not LINUX, reason="reads the process table from /proc")
def test_sigterm_mid_build_leaves_no_staging_folder(tmp_path):
    out = tmp_path / "art"
    p = _start_build(out)
    try:
        assert _wait_for(lambda: any(n.startswith(".art.work-") for n in siblings(out)) and _children(p.pid), 120)
        time.sleep(1.0)  # the trace child is running
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert siblings(out) == [] and not out.exists()
    assert _children(p.pid) == []


@pytest.mark.skipif(not LINUX, reason="reads the process table from /proc")
def test_sigkill_of_the_parent_ends_the_trace_child_and_the_next_build_cleans_up(tmp_path):
    out = tmp_path / "art"
    p = _start_build(out)
    try:
        assert _wait_for(lambda: any(n.startswith(".art.work-") for n in siblings(out)) and _children(p.pid), 120)
        time.sleep(1.0)
        kids = _children(p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        p.kill()
    assert _wait_for(lambda: not any(Path(f"/proc/{k}").exists() and _state(k) != "Z" for k in kids), 5), kids
    assert siblings(out)  # SIGKILL cannot be cleaned up after...
    with ArtifactWriter(out) as w:  # ...but the next build of the same --out removes what it left
        assert sorted(siblings(out)) == sorted([w.folder.name, w.work.name])


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.skipif(not LINUX, reason="RLIMIT_FSIZE stands in for a full disk")
def test_a_full_disk_is_one_line_not_a_traceback(tmp_path):
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))  # the demo's weights are ~18 MB

    out = tmp_path / "art"
    r = cli("--code", "arith", "--out", str(out), preexec_fn=small_files)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left writing") and "choose another --out" in last, r.stderr
    assert "Traceback" not in r.stderr
    assert siblings(out) == [] and not out.exists()


def test_remote_code_files_are_the_auto_map_modules_and_their_local_imports(tmp_path):
    f = tmp_path / "ckpt"
    f.mkdir()
    (f / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                            "AutoModelForCausalLM": "repo--modeling_x.XModel"}}))
    (f / "configuration_x.py").write_text("from transformers import PretrainedConfig\n")
    (f / "modeling_x.py").write_text("import torch\nfrom .configuration_x import XConfig\nfrom . import helpers\n")
    (f / "helpers.py").write_text("import util_x\n")
    (f / "util_x.py").write_text("")
    (f / "unused.py").write_text("raise SystemExit('never imported')\n")
    assert sorted(remote_code_files(f)) == ["configuration_x.py", "helpers.py", "modeling_x.py", "util_x.py"]
    assert DEMO_MODEL_DIR.is_dir() and remote_code_files(DEMO_MODEL_DIR) == []
