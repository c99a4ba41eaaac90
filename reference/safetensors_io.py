"""safetensors files, read and written by hand, and the rule that a checkpoint's files stay in its folder.

Why not `safetensors.torch.load_file`: the format is an 8-byte little-endian header length, a JSON
header and raw little-endian bytes, so reading every header first lets a loader refuse a bad folder
(bad offsets, wrong sizes, truncated file) before touching gigabytes, and reading each tensor with a
plain `readinto` into its final buffer keeps peak memory near one copy of the weights (an mmap would
add the file pages to RSS).

`read_header` checks the whole header before any tensor is read: a sane header length for the file
size, a JSON object, every entry an object with a known dtype, a shape of non-negative integers and
`data_offsets` of two integers inside the data section whose span is exactly shape x dtype size, and
no two tensors overlapping. A bad file is a `CheckpointError` of one line that names the file, the
tensor and the fix; nothing else escapes.

`inside_folder` is the one check that a file a checkpoint names (a shard of the index, config.json,
a tokenizer file that the exporter copies into the artifact) is a file of that folder: symlinks may
point elsewhere inside it, but not out of it, not in a loop and not nowhere. The Hugging Face cache
layout (`models--org--name/snapshots/REV/file -> ../../blobs/HASH`) counts as inside: its root is
the repository's cache folder.
"""
from __future__ import annotations

import errno
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own reader refuses headers over 100 MB too
REWRITE = "re-download or re-write the file"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOATS = ("F64", "F32", "F16", "BF16")
INTEGERS = ("U8", "I8", "I16", "I32", "I64", "BOOL")


class CheckpointError(ValueError):
    """A checkpoint folder we refuse to read or write; the one-line message names the file and the fix."""


@dataclass
class TensorInfo:
    """Where one stored tensor lives, from the file header alone (no data read)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


# -- the folder rule ---------------------------------------------------------------------------
def allowed_root(folder: str | Path) -> Path:
    """The folder files may resolve into: the folder itself, or a hub cache repository folder."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def inside_folder(folder: str | Path, path: str | Path) -> Path:
    """`path` (a file of `folder`, possibly a symlink) resolved; a CheckpointError unless it is a
    regular file that resolves inside the folder (no `..`, absolute name, link out, loop or dangling link)."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: a symlink loop; replace it with the real file") from None
        if os.path.islink(path):
            raise CheckpointError(f"{path}: a symlink to {os.readlink(path)}, which does not exist; replace it with the real file") from None
        raise CheckpointError(f"{path}: missing from {folder}; put the file there") from None
    real = Path(os.path.realpath(path))
    root = allowed_root(folder)
    if not real.is_relative_to(root):
        raise CheckpointError(f"{path}: resolves to {real}, outside {folder}; checkpoint files must be inside "
                              "their folder: copy the file in instead of linking to it")
    if not real.is_file():
        raise CheckpointError(f"{path}: not a regular file; put the file itself there")
    return real


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards, model.safetensors, or every *.safetensors."""
    index = folder / INDEX_FILE
    if os.path.lexists(index):
        index = inside_folder(folder, index)
        weight_map = read_json_object(index, REWRITE).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{folder / INDEX_FILE}: 'weight_map' must map tensor names to file names; {REWRITE}")
        names = sorted(set(weight_map.values()))
        for name in names:
            if os.path.isabs(name) or ".." in Path(name).parts:
                raise CheckpointError(f"{folder / INDEX_FILE}: shard {name} is outside {folder}; shards must be files of "
                                      "the checkpoint folder: fix the index's weight_map")
            if not os.path.lexists(folder / name):
                raise CheckpointError(f"{folder / INDEX_FILE}: lists shard {name}, which is missing from {folder}; download every shard")
        for name in names:
            inside_folder(folder, folder / name)
        return [folder / name for name in names]
    if os.path.lexists(folder / SINGLE_FILE):
        inside_folder(folder, folder / SINGLE_FILE)
        return [folder / SINGLE_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        for path in found:
            inside_folder(folder, path)
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder / pickles[0]}: only pickle weights found ({', '.join(pickles)}); pickle files can run arbitrary "
            "code when loaded, so they are never unpickled here. Convert them to model.safetensors on a machine you "
            "trust (safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors'))"
        )
    raise CheckpointError(f"{folder}: no model.safetensors (or shards with {INDEX_FILE}); put the weights in the folder")


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """A UTF-8 JSON object from `path`, or one CheckpointError naming the file and the fix (`missing`
    is what to say when there is no such file)."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {missing}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); check the file and its permissions") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text; save it as UTF-8 JSON") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:100]}); fix or regenerate the file") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(raw).__name__}; it must be a JSON object")
    return raw


# -- reading -----------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: Path, name: str, meta: Any, data_len: int, base: int) -> TensorInfo:
    """One header entry, checked field by field."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header entry is {type(meta).__name__}, not an object; {REWRITE}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            raise CheckpointError(f"{where}: header entry has no '{key}'; {REWRITE}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: dtype {dtype!r} is not one we read ({', '.join(DTYPES)}); store it as F32, F16 or BF16")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers; {REWRITE}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not two integers [begin, end]; {REWRITE}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"{where}: data_offsets {offsets} fall outside the data section [0, {data_len}] "
                              f"(or begin > end); the file is truncated or corrupt: {REWRITE}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} needs {nbytes}; {REWRITE}")
    return TensorInfo(name, path, dtype, tuple(shape), base + begin, nbytes)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check all of it against the file (see the module doc)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n}, file of {size} bytes); {REWRITE}")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); check the file and its permissions") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: the safetensors header is not valid UTF-8 JSON; {REWRITE}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object; {REWRITE}")
    if "__metadata__" in header and not isinstance(header["__metadata__"], dict):
        raise CheckpointError(f"{path}: __metadata__ must be an object; {REWRITE}")
    data_len, base = size - 8 - n, 8 + n
    out = {name: _entry(path, name, meta, data_len, base) for name, meta in header.items() if name != "__metadata__"}
    spans = sorted(((t.start, t.start + t.nbytes, t.name) for t in out.values() if t.nbytes), key=lambda s: s[:2])
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{path}: tensor '{name}' overlaps tensor '{prev}' in the data section; {REWRITE}")
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor straight into its own buffer (no mmap, so RSS grows by exactly its bytes)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start)
        got = 0
        while got < info.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{info.file}: truncated while reading '{info.name}'; {REWRITE}")
            got += n
    return buf.view(DTYPES[info.dtype]).reshape(info.shape)


# -- writing -----------------------------------------------------------------------------------
Spec = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it into place (0644)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoint files are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def header_bytes(specs: list[Spec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_safetensors(path: Path, specs: list[Spec], produce: Callable[[str], torch.Tensor]) -> None:
    """Stream one safetensors file: header first, then each tensor as `produce(name)` makes it.

    Only one tensor is alive at a time, which is what lets the factory write the 0.5B model in
    about one tensor's memory. Written to a temp name and renamed into place.
    """
    def write(f) -> None:
        f.write(header_bytes(specs))
        for name, dtype, shape in specs:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or DTYPE_NAMES[t.dtype] != dtype:
                raise CheckpointError(f"internal: tensor {name} is {t.dtype} {list(t.shape)}, announced {dtype} {list(shape)}")
            f.write(_tensor_bytes(t))

    atomic_write(path, write)


def write_weights(folder: Path, specs: list[Spec], produce: Callable[[str], torch.Tensor],
                  shard_size_bytes: int | None = None) -> list[Path]:
    """model.safetensors, or shards of at most shard_size_bytes (one big tensor may exceed it) + index."""
    sizes = [math.prod(s) * DTYPES[dt].itemsize for _, dt, s in specs]
    groups: list[list[int]] = [[]]
    if shard_size_bytes:
        used = 0
        for i, n in enumerate(sizes):
            if groups[-1] and used + n > shard_size_bytes:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n
    else:
        groups = [list(range(len(specs)))]
    names = [SINGLE_FILE] if len(groups) == 1 else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    written: list[Path] = []
    for fname, group in zip(names, groups):
        write_safetensors(folder / fname, [specs[i] for i in group], produce)
        written.append(folder / fname)
    index = folder / INDEX_FILE
    if len(groups) > 1:
        weight_map = {specs[i][0]: fname for fname, group in zip(names, groups) for i in group}
        atomic_write_text(index, json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2) + "\n")
        written.append(index)
    # a previous checkpoint in the same folder must not leave stale weights behind
    for old in list(folder.glob("model*.safetensors")) + [index]:
        if old.exists() and old not in written:
            old.unlink()
    return written


__all__ = [
    "CheckpointError", "TensorInfo", "DTYPES", "DTYPE_NAMES", "FLOATS", "INTEGERS", "SINGLE_FILE", "INDEX_FILE",
    "inside_folder", "allowed_root", "read_json_object", "weight_files", "read_header", "read_tensor",
    "atomic_write", "atomic_write_text", "header_bytes", "write_safetensors", "write_weights",
]
