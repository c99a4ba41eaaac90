"""sha256 of an artifact's files, checked on every load, with a cache of verified stamps.

Hashing a 2 GB weights file costs seconds; a load should not. So a file whose hash matched once is
remembered by its stamp: absolute path, size, mtime_ns, ctime_ns, inode and device. Any write to the
file changes mtime and ctime (ctime cannot be set back by a user), a copy or a replacement changes
the inode, so a stamp that still matches means the bytes are the ones that were hashed.

The cache lives in the user's cache folder ($TABLEFREE_CACHE, else $XDG_CACHE_HOME/tablefree-onnx,
else ~/.cache/tablefree-onnx), never in the artifact folder (which may be read-only or shared). It
is written atomically (temp file + rename); an unreadable or corrupt cache is ignored, and one that
cannot be written only costs the next load a hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

STAMP_FILE = "verified-stamps-v1.json"
MAX_ENTRIES = 1024  # oldest entries go first; an entry is ~200 bytes


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    if os.environ.get("TABLEFREE_CACHE"):
        return Path(os.environ["TABLEFREE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tablefree-onnx"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class StampCache:
    """path -> (stamp, sha256) of files whose hash was checked."""

    def __init__(self, path: Path | None = None):
        self.path = path if path is not None else cache_dir() / STAMP_FILE
        self.entries = self._read()
        self._added: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("stamp"), list)
                and isinstance(v.get("sha256"), str)}

    def verified(self, path: str, st: os.stat_result, sha256: str) -> bool:
        e = self.entries.get(path)
        return e is not None and e["stamp"] == _stamp(st) and e["sha256"] == sha256

    def add(self, path: str, st: os.stat_result, sha256: str) -> None:
        self._added[path] = {"stamp": _stamp(st), "sha256": sha256}

    def save(self) -> None:
        if not self._added:
            return
        merged = {**self._read(), **self._added}  # keep what other processes wrote meanwhile
        for key in list(merged)[: max(0, len(merged) - MAX_ENTRIES)]:
            del merged[key]
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".stamps-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(merged, f)
            os.replace(tmp, self.path)
            tmp = None
        except OSError:
            pass  # a read-only home: the next load hashes again, nothing worse
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        self.entries, self._added = merged, {}


def check_sha256(path: Path, want: str, cache: StampCache | None) -> bool:
    """True when the file's sha256 is `want` (from the stamp cache when its stamp is unchanged)."""
    key = os.path.abspath(path)
    st = os.stat(key)
    if cache is not None and cache.verified(key, st, want):
        return True
    ok = sha256_file(Path(key)) == want
    if ok and cache is not None and _stamp(os.stat(key)) == _stamp(st):  # not written while we read it
        cache.add(key, st, want)
    return ok
