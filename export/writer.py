"""`ArtifactWriter`: the one object that writes an artifact folder (as llama.cpp's gguf_writer owns a GGUF file).

It owns the staging folder (`.<out>.tmp-PID`) and the trace child's work folder (`.<out>.work-PID`)
beside `--out`, every file written into the artifact (each one atomically: a temp name, then a
rename), the list of those files, the sha256 table and manifest.json, and the final move of the
folder into place. Nothing else in the exporter writes artifact files: graph passes (graphs/)
return models and the writer saves them.

Cleanup: both folders go on any exit the process sees (an exception, SIGINT, SIGTERM, SIGHUP:
`build` turns the last two into an exception while the writer is open). Folders left by a build
that was killed outright (SIGKILL, power loss) are removed by the next build of the same `--out`
once their PID is gone.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from runtime.artifact import sha256_file
from runtime.interface import MANIFEST_FILE

from .errors import ExportError

# write errors that mean "the disk (or the user's quota / ulimit -f) is full"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
STAGING_KINDS = ("tmp", "work", "old", "probe")  # .<out>.<kind>-<pid>: every sibling a build makes


def disk_full_error(e: BaseException, what: str | os.PathLike) -> ExportError | None:
    """The one-line error for a full disk while writing `what`, or None when `e` is something else."""
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return ExportError(f"no space left writing {what} ({os.strerror(e.errno)}); free space or choose another --out")
    return None


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `path` through a temp file in the same folder and a rename: readers see all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, data_name: str | None = None,
              base_dir: str | os.PathLike | None = None, size_threshold: int = 1024) -> Path:
    """Write `path` + its weights file `data_name` (default `<name>.data`) via a temp folder and renames.

    Tensors still in some other data file (a model loaded with `load_external_data=False`) are read
    from `base_dir` first. The model's raw data moves out to the file: afterwards the in-memory
    proto points at the saved data.
    """
    path = Path(path)
    data_name = data_name or f"{path.name}.data"
    missing = [t.name for t in model.graph.initializer
               if t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data")]
    if missing:
        if base_dir is None:
            raise ValueError(f"{len(missing)} tensors (e.g. {missing[0]!r}) are not loaded; pass base_dir "
                             "(the folder of their data file) or load the model with its external data")
        onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(model, tmp / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=size_threshold)
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove `.<out>.{tmp,work,old,probe}-PID` siblings whose PID no longer runs; returns what went."""
    out = Path(out).absolute()
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{'|'.join(STAGING_KINDS)})-(\d+)$")
    gone = []
    if not out.parent.is_dir():
        return gone
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


class ArtifactWriter:
    """Assembles one artifact in a staging folder beside `out`; `commit()` moves it into place.

    Use as a context manager: on exit (normal or not) the staging and work folders are removed,
    so only `commit()` or `keep_failed()` leave anything behind. Every write goes through here,
    is atomic, and is recorded in `files`; the manifest hashes exactly those files.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).absolute()
        pid = os.getpid()
        self.folder = self.out.with_name(f".{self.out.name}.tmp-{pid}")  # the staging folder
        self.work = self.out.with_name(f".{self.out.name}.work-{pid}")  # the trace child writes here
        self.files: list[str] = []

    def __enter__(self) -> ArtifactWriter:
        remove_stale(self.out)
        for p in (self.folder, self.work):
            shutil.rmtree(p, ignore_errors=True)
            self._guard(p, p.mkdir, parents=True)
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        for p in (self.folder, self.work):
            shutil.rmtree(p, ignore_errors=True)

    # -- writes ---------------------------------------------------------------------------------

    def _guard(self, what: str | os.PathLike, fn, *args, **kwargs):
        """Run a write; a full disk becomes one line naming the file."""
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            err = disk_full_error(e, what)
            if err is None:
                raise
            raise err from None

    def _add(self, name: str) -> Path:
        if "/" in name or name in (MANIFEST_FILE, "", ".", ".."):
            raise ValueError(f"{name!r}: the artifact is one flat folder and manifest.json is written by write_manifest")
        if name not in self.files:
            self.files.append(name)
        return self.folder / name

    def path(self, name: str) -> Path:
        """Where `name` lives in the staging folder (to read back what was written)."""
        return self.folder / name

    def write_bytes(self, name: str, data: bytes | str) -> Path:
        dst = self._add(name)
        return self._guard(dst, atomic_write, dst, data)

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_bytes(name, json.dumps(obj, indent=2) + "\n")

    def copy_file(self, name: str, src: str | os.PathLike) -> Path:
        """Copy a file from the checkpoint (tokenizer files) into the artifact."""
        return self.write_bytes(name, Path(src).read_bytes())

    def adopt(self, name: str, src: str | os.PathLike) -> Path:
        """Move a file written by another process into the work folder (the traced fp32 graph) into the artifact."""
        dst = self._add(name)
        self._guard(dst, os.replace, src, dst)
        return dst

    def save_model(self, name: str, model: onnx.ModelProto, data_name: str, base_dir: str | os.PathLike | None = None) -> Path:
        """A graph with its weights in `data_name` (both recorded)."""
        dst = self._add(name)
        self._add(data_name)
        self._guard(dst, save_onnx, model, dst, data_name=data_name, base_dir=base_dir)
        if not (self.folder / data_name).is_file():
            raise ExportError(f"{name}: no weights were written to {data_name}; this is a bug in the exporter")
        return dst

    def write_model(self, name: str, model: onnx.ModelProto) -> Path:
        """A graph whose weights already live in a data file of this folder (plain serialization:
        onnx.save would try to move external data)."""
        return self.write_bytes(name, model.SerializeToString())

    # -- the manifest and the move ---------------------------------------------------------------

    def hashes(self) -> dict[str, dict[str, Any]]:
        """sha256 and size of every file written, sorted by name; refuses a folder holding anything else."""
        present = sorted(p.name for p in self.folder.iterdir())
        stray = sorted(set(present) - set(self.files) - {MANIFEST_FILE})
        missing = sorted(set(self.files) - set(present))
        if stray or missing:
            raise ExportError(f"the staging folder {self.folder} holds {stray} not written by the exporter and lacks "
                              f"{missing}; this is a bug in the exporter")
        return {n: {"sha256": sha256_file(self.folder / n), "size": (self.folder / n).stat().st_size}
                for n in sorted(self.files)}

    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """manifest.json: `manifest` plus the `files` table (every file but the manifest itself)."""
        manifest = {**manifest, "files": self.hashes()}
        dst = self.folder / MANIFEST_FILE
        self._guard(dst, atomic_write, dst, json.dumps(manifest, indent=2) + "\n")
        return manifest

    def commit(self) -> Path:
        """Replace `out` by the staging folder with renames only: an old artifact stays whole until the new one is in."""
        out, old = self.out, None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        try:
            os.replace(self.folder, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return out

    def keep_failed(self) -> Path:
        """Park a failed build as `<out>.failed` (replacing an older failure) so its report can be read."""
        failed = self.out.with_name(self.out.name + ".failed")
        if failed.exists():
            shutil.rmtree(failed, ignore_errors=True)
        os.replace(self.folder, failed)
        return failed


__all__ = ["ArtifactWriter", "atomic_write", "save_onnx", "remove_stale", "disk_full_error", "DISK_FULL"]
