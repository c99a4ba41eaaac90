"""Checkpoint folders (SPEC 2): read and write Hugging Face style safetensors folders.

Why this module reads safetensors itself instead of calling `safetensors.torch.load_file`:
the format is an 8-byte header length, a JSON header and raw little-endian bytes, so reading the
headers first lets us refuse a bad folder (wrong sizes, missing tensor, wrong dtype, truncated
file) before touching gigabytes, and reading each tensor with a plain `readinto` into its final
buffer keeps peak memory near one copy of the weights (an mmap would add the file pages to RSS).

Foreign folders are read through an adapter: each stored tensor name goes, in this order, through
the user's key map, the canonical names, the name patterns of nanoGPT / Llama / GPT-NeoX, and the
search for the code matrix `A` and offset `b` (U8 tensors of shape [K, K] and [K] under any name).
Whatever is left unmapped stops loading with one error that lists every such tensor.

Key map (`key_map=` here, `--key-map FILE.json` at the CLI): a JSON object
`{"foreign name or regex": "canonical name" | null}`. A key equal to a stored name maps that
tensor; otherwise the key is a Python regular expression that must match the WHOLE stored name,
and the value may use `\\1`-style group references. `null` drops the tensor (e.g. a cached rotary
table). Besides the SPEC 2 names, two fused targets are accepted: `layers.{i}.attn.qkv_proj.weight`
/ `.bias` (q, k and v concatenated along the output features, as nanoGPT's `c_attn`) and
`layers.{i}.attn.qkv_heads.weight` / `.bias` (per head [q, k, v] blocks, as GPT-NeoX's
`query_key_value`).

Pickle files (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) are never opened: unpickling runs code.
No file of the folder is ever imported or executed here.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from runtime.interface import CONFIG_FILE

from .config import ConfigError, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

KeyMap = dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint folder we refuse to read or write; the one-line message names the file and the fix."""


# -- safetensors dtypes ----------------------------------------------------------------------
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_FLOATS = ("F64", "F32", "F16", "BF16")
_INTEGERS = ("U8", "I8", "I16", "I32", "I64", "BOOL")


@dataclass
class TensorInfo:
    """Where one stored tensor lives, from the file header alone (no data read)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


# -- canonical names -------------------------------------------------------------------------
def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every SPEC 2 tensor this config needs, in the model's state_dict order, with its shape."""
    d, f, V, K = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.code.bits
    out: dict[str, tuple[int, ...]] = {"code.A": (K, K), "code.b": (K,)}

    def norm(prefix: str) -> None:
        out[f"{prefix}.weight"] = (d,)
        if cfg.norm_bias:
            out[f"{prefix}.bias"] = (d,)

    def linear(prefix: str, n_out: int, n_in: int, bias: bool) -> None:
        out[f"{prefix}.weight"] = (n_out, n_in)
        if bias:
            out[f"{prefix}.bias"] = (n_out,)

    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        norm(f"{p}.ln1")
        for n in "qkvo":
            linear(f"{p}.attn.{n}_proj", d, d, cfg.attention_bias)
        if cfg.has_ln2:
            norm(f"{p}.ln2")
        linear(f"{p}.mlp.up_proj", f, d, cfg.mlp_bias)
        linear(f"{p}.mlp.down_proj", d, f, cfg.mlp_bias)
    norm("ln_f")
    out["lm_head.weight"] = (V, d)
    if cfg.input_table:  # the learned-input-table baseline (lift mode "table")
        out["embed_tokens.weight"] = (V, d)
    return out


_CANONICAL_RE = re.compile(
    r"code\.[Ab]|lm_head\.weight|embed_tokens\.weight|ln_f\.(weight|bias)"
    r"|layers\.\d+\.(ln1|ln2)\.(weight|bias)"
    r"|layers\.\d+\.attn\.(q|k|v|o|qkv)_proj\.(weight|bias)"
    r"|layers\.\d+\.attn\.qkv_heads\.(weight|bias)"
    r"|layers\.\d+\.mlp\.(up|down)_proj\.(weight|bias)"
)

# Built-in adapters: (regex on the stored name, canonical template or None to drop).
_PATTERNS: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(p), t) for p, t in [
        # nanoGPT (nn.Linear layout [out, in]; c_attn = q, k, v concatenated)
        (r"transformer\.h\.(\d+)\.ln_1\.(weight|bias)", r"layers.\1.ln1.\2"),
        (r"transformer\.h\.(\d+)\.ln_2\.(weight|bias)", r"layers.\1.ln2.\2"),
        (r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"layers.\1.attn.qkv_proj.\2"),
        (r"transformer\.h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"layers.\1.attn.o_proj.\2"),
        (r"transformer\.h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"layers.\1.mlp.up_proj.\2"),
        (r"transformer\.h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"layers.\1.mlp.down_proj.\2"),
        (r"transformer\.ln_f\.(weight|bias)", r"ln_f.\1"),
        (r"(?:transformer\.|model\.)?(?:wte|embed_tokens)\.weight|gpt_neox\.embed_in\.weight", "embed_tokens.weight"),
        (r"transformer\.h\.\d+\.attn\.(bias|masked_bias)", None),  # causal-mask buffers
        # Llama style (and Phi's fc1/fc2, Phi-3's fused qkv_proj)
        (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o|qkv)_proj\.(weight|bias)", r"layers.\1.attn.\2_proj.\3"),
        (r"model\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.ln1.\2"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.ln2.\2"),
        (r"model\.layers\.(\d+)\.mlp\.(?:up_proj|fc1)\.(weight|bias)", r"layers.\1.mlp.up_proj.\2"),
        (r"model\.layers\.(\d+)\.mlp\.(?:down_proj|fc2)\.(weight|bias)", r"layers.\1.mlp.down_proj.\2"),
        (r"model\.norm\.(weight|bias)", r"ln_f.\1"),
        (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", None),
        # GPT-NeoX (query_key_value holds per-head [q, k, v] blocks)
        (r"gpt_neox\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.ln1.\2"),
        (r"gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.ln2.\2"),
        (r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv_heads.\2"),
        (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.(weight|bias)", r"layers.\1.attn.o_proj.\2"),
        (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up_proj.\2"),
        (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down_proj.\2"),
        (r"gpt_neox\.final_layer_norm\.(weight|bias)", r"ln_f.\1"),
        (r"embed_out\.weight", "lm_head.weight"),
        (r"gpt_neox\.layers\.\d+\.attention\.(rotary_emb\.inv_freq|bias|masked_bias)", None),
    ]
]
# Wrappers that prefix every name: torch.compile and DistributedDataParallel.
_STRIP_PREFIXES = ("_orig_mod.", "module.")
# Names under which A / b are plausibly stored (last name component A, code_A, affine_A, ...).
_A_NAME = re.compile(r"(?:.*[._])?(?:code_|affine_|recode_)?A")
_B_NAME = re.compile(r"(?:.*[._])?(?:code_|affine_|recode_)?b")


# -- reading headers -------------------------------------------------------------------------
def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check every tensor fits inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short); re-download or re-write it")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header of {n} bytes); re-download or re-write it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header; re-download or re-write it") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype}, which we cannot read; store it as F32, F16 or BF16")
        s, e = meta["data_offsets"]
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if e - s != nbytes:
            raise CheckpointError(f"{path}: tensor '{name}' header is inconsistent ({e - s} bytes for shape {list(shape)}); re-write the file")
        if base + e > size:
            raise CheckpointError(
                f"{path}: truncated (tensor '{name}' ends at byte {base + e}, the file has {size}); re-download or re-write it"
            )
        out[name] = TensorInfo(name, path, dtype, shape, base + s, nbytes)
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
                raise CheckpointError(f"{info.file}: truncated while reading '{info.name}'; re-download or re-write it")
            got += n
    return buf.view(_DTYPES[info.dtype]).reshape(info.shape)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'); re-download or re-write it") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise CheckpointError(f"{index}: lists shard {name}, which is missing from {folder}; download every shard")
        return [folder / name for name in files]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder / pickles[0]}: only pickle weights found ({', '.join(pickles)}); pickle files can run arbitrary "
            "code when loaded, so they are never unpickled here. Convert them to model.safetensors on a machine you "
            "trust (safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors'))"
        )
    raise CheckpointError(f"{folder}: no model.safetensors (or shards with {INDEX_FILE}); put the weights in the folder")


def _load_key_map(key_map: str | Path | KeyMap | None) -> KeyMap:
    if key_map is None:
        return {}
    if isinstance(key_map, dict):
        return dict(key_map)
    path = Path(key_map)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: key map file not found; pass --key-map with an existing JSON file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: key map is not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict) or not all(isinstance(v, (str, type(None))) for v in data.values()):
        raise CheckpointError(f'{path}: a key map is a JSON object {{"foreign name or regex": "canonical name" or null}}')
    return data


def _resolve(name: str, key_map: KeyMap, compiled: list[tuple[re.Pattern[str], Any]]) -> tuple[bool, str | None]:
    """(matched, target) for one stored name; target None means drop it."""
    if name in key_map:
        return True, key_map[name]
    for pat, target in compiled:
        m = pat.fullmatch(name)
        if m:
            return True, None if target is None else m.expand(target)
    stripped = name
    for prefix in _STRIP_PREFIXES:
        if stripped.startswith(prefix):
            stripped = stripped[len(prefix):]
    if _CANONICAL_RE.fullmatch(stripped):
        return True, stripped
    for pat, target in _PATTERNS:
        m = pat.fullmatch(stripped)
        if m:
            return True, None if target is None else m.expand(target)
    return False, None


# -- the loader ------------------------------------------------------------------------------
def _raw_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs config.json (Hugging Face layout)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or regenerate the file") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return raw


def _config_has_matrix(raw: dict[str, Any], key: str) -> bool:
    code = raw.get("code") if isinstance(raw.get("code"), dict) else {}
    return key in code or any(c in raw for c in (key, f"code_{key}", f"affine_{key}"))


def _size_hint(cfg: ModelConfig, mapped: dict[str, TensorInfo]) -> str:
    """What the weights say the sizes are, so the error tells the user the right numbers."""
    said: dict[str, int] = {}
    if "lm_head.weight" in mapped and len(mapped["lm_head.weight"].shape) == 2:
        said["vocab_size"], said["hidden_size"] = mapped["lm_head.weight"].shape
    up = mapped.get("layers.0.mlp.up_proj.weight")
    if up is not None and len(up.shape) == 2:
        said["intermediate_size"] = up.shape[0]
    wrong = [f"{k}={v}" for k, v in said.items() if getattr(cfg, k) != v]
    return f" (the weights say {', '.join(wrong)})" if wrong else ""


def load_checkpoint(folder: str | Path, key_map: str | Path | KeyMap | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and canonical state dict (floats fp32, code.A/code.b uint8), validated from headers first.

    Without A/b in the weights or the config, the code is the identity recoding (the fixed-code
    sibling of the seed). Bias flags of the returned config come from the weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist; pass the folder that holds config.json and model.safetensors")
    raw = _raw_config(folder)
    config_path = folder / CONFIG_FILE
    try:
        cfg = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: cannot read it as a model config ({e}); fix config.json") from None

    infos: dict[str, TensorInfo] = {}
    for path in _weight_files(folder):
        for name, info in read_header(path).items():
            if name in infos:
                raise CheckpointError(f"{path}: tensor '{name}' also stored in {infos[name].file.name}; remove the duplicate")
            infos[name] = info

    # 1. names -> canonical (or fused) names
    kmap = _load_key_map(key_map)
    compiled = [(re.compile(k), v) for k, v in kmap.items()]
    mapped: dict[str, TensorInfo] = {}
    unmapped: list[TensorInfo] = []
    for name, info in infos.items():
        ok, target = _resolve(name, kmap, compiled)
        if not ok:
            unmapped.append(info)
            continue
        if target is None:
            continue
        if not _CANONICAL_RE.fullmatch(target):
            raise CheckpointError(f"key map sends '{name}' to '{target}', which is not a canonical tensor name (SPEC 2); fix the key map")
        if target in mapped:
            raise CheckpointError(f"{info.file}: both '{mapped[target].name}' and '{name}' map to '{target}'; fix the key map")
        mapped[target] = info

    # 2. the code matrix A and offset b: by name or as U8 [K, K] / [K] tensors
    K = cfg.code.bits
    for key, shape, by_name in (("code.A", (K, K), _A_NAME), ("code.b", (K,), _B_NAME)):
        if key in mapped:
            continue
        named = [t for t in unmapped if by_name.fullmatch(t.name) and t.shape == shape]
        found = named or [t for t in unmapped if t.dtype in ("U8", "BOOL") and t.shape == shape]
        if len(found) > 1:
            names = ", ".join(t.name for t in found)
            raise CheckpointError(f"{found[0].file}: several candidates for {key} ({names}); name the right one with --key-map FILE.json")
        if found:
            mapped[key] = found[0]
            unmapped.remove(found[0])
    if unmapped:
        listed = ", ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in unmapped)
        raise CheckpointError(
            f"{folder}: {len(unmapped)} tensor(s) we cannot map to the model: {listed}. Map them by hand with "
            "--key-map FILE.json (a JSON object {\"foreign name or regex\": \"canonical name or null\"})"
        )

    # 3. biases are detected from the weights, not trusted from the config
    present = set(mapped)
    cfg.attention_bias = any(re.fullmatch(r"layers\.\d+\.attn\.(q|k|v|o|qkv)_proj\.bias|layers\.\d+\.attn\.qkv_heads\.bias", n) for n in present)
    cfg.mlp_bias = any(re.fullmatch(r"layers\.\d+\.mlp\.(up|down)_proj\.bias", n) for n in present)
    cfg.norm_bias = any(re.fullmatch(r"(layers\.\d+\.ln[12]|ln_f)\.bias", n) for n in present)
    cfg.input_table = "embed_tokens.weight" in present  # the learned-table baseline, recognised by its table
    if not any(".ln2." in n for n in present) and any(".ln1." in n for n in present):
        cfg.parallel_residual, cfg.parallel_norms = True, 1  # one norm per block: GPT-J's parallel layout

    layer_ids = {int(m.group(1)) for n in present if (m := re.match(r"layers\.(\d+)\.", n))}
    if layer_ids and max(layer_ids) + 1 != cfg.num_hidden_layers:
        raise CheckpointError(
            f"{config_path}: num_hidden_layers = {cfg.num_hidden_layers} but the weights hold {max(layer_ids) + 1} layers; "
            "fix config.json so its sizes match the weights"
        )

    # 4. shapes and dtypes, from the headers, against the config
    expected = canonical_shapes(cfg)
    d = cfg.hidden_size
    fused_shapes = {"weight": (3 * d, d), "bias": (3 * d,)}
    for target, info in mapped.items():
        m = re.fullmatch(r"layers\.(\d+)\.attn\.(qkv_proj|qkv_heads)\.(weight|bias)", target)
        want = fused_shapes[m.group(3)] if m else expected.get(target)
        if want is None:  # e.g. a bias tensor of a kind the rest of the model lacks
            raise CheckpointError(f"{info.file}: tensor '{info.name}' ({target}) does not fit this model; drop it with a --key-map FILE.json entry mapping it to null")
        if info.shape != want:
            raise CheckpointError(
                f"{config_path}: sizes disagree with {info.file.name}: tensor '{info.name}' ({target}) has shape "
                f"{list(info.shape)}, config implies {list(want)} (hidden_size={cfg.hidden_size}, "
                f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size}){_size_hint(cfg, mapped)}; "
                "fix config.json so its sizes match the weights"
            )
        if target in ("code.A", "code.b"):
            if info.dtype not in _INTEGERS:
                raise CheckpointError(
                    f"{info.file}: tensor '{info.name}' ({target}) has dtype {info.dtype}; the code A and b are GF(2) "
                    "values and must be stored as uint8 0/1 (convert with .to(torch.uint8))"
                )
        elif info.dtype not in _FLOATS:
            raise CheckpointError(f"{info.file}: tensor '{info.name}' ({target}) has dtype {info.dtype}; store weights as F32, F16 or BF16")
    covered = set(mapped)
    for target in list(mapped):
        m = re.fullmatch(r"layers\.(\d+)\.attn\.(qkv_proj|qkv_heads)\.(weight|bias)", target)
        if m:
            covered |= {f"layers.{m.group(1)}.attn.{n}_proj.{m.group(3)}" for n in "qkv"}
    from_config = {k for k in ("code.A", "code.b") if _config_has_matrix(raw, k[-1])}
    missing = [n for n in expected if n not in covered and not (n in ("code.A", "code.b"))]
    if missing:
        where = ", ".join(sorted({str(t.file.name) for t in infos.values()})) or "the weights"
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{folder / where.split(', ')[0]}: missing tensor(s) {shown}; the checkpoint is incomplete: re-download or re-write it")

    # 5. A and b first (tiny), then the config is complete and can be validated
    for key in ("code.A", "code.b"):
        if key not in mapped:
            continue  # from config.json lists, or the identity recoding
        info = mapped[key]
        t = read_tensor(info).to(torch.int64).numpy()
        if np.any((t != 0) & (t != 1)):
            raise CheckpointError(f"{info.file}: tensor '{info.name}' ({key}) holds values other than 0 and 1; A and b are over GF(2): store 0/1")
        if key in from_config:
            have = cfg.code.A if key == "code.A" else cfg.code.b
            if not np.array_equal(np.asarray(have), t):
                raise CheckpointError(f"{config_path}: code {key[-1]} in config.json differs from tensor '{info.name}' in {info.file.name}; keep one of them")
        if key == "code.A":
            cfg.code.A = t.astype(np.uint8)
        else:
            cfg.code.b = t.astype(np.uint8)
    try:
        cfg.validate()
    except ConfigError as e:  # name the file A came from: a weights file or config.json
        where = mapped["code.A"].file if "code.A" in mapped and "singular" in str(e) else config_path
        raise CheckpointError(f"{where}: {e}") from None

    # 6. the weights, one tensor at a time, upcast to fp32
    state: dict[str, torch.Tensor] = {
        "code.A": torch.from_numpy(cfg.code.A.copy()),
        "code.b": torch.from_numpy(cfg.code.b.copy()),
    }
    h, hs = cfg.num_attention_heads, cfg.head_size
    for target, info in mapped.items():
        if target in ("code.A", "code.b"):
            continue
        t = read_tensor(info)
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        m = re.fullmatch(r"layers\.(\d+)\.attn\.(qkv_proj|qkv_heads)\.(weight|bias)", target)
        if m is None:
            state[target] = t
            continue
        i, kind, part = m.groups()
        if kind == "qkv_heads":  # [heads, (q, k, v), head_size, ...] -> [(q, k, v), heads * head_size, ...]
            t = t.reshape(h, 3, hs, *t.shape[1:]).transpose(0, 1).reshape(3 * d, *t.shape[1:])
        for n, piece in zip("qkv", t.chunk(3, dim=0)):
            state[f"layers.{i}.attn.{n}_proj.{part}"] = piece.contiguous()
    return cfg, {k: state[k] for k in expected}


def load_model(folder: str | Path, key_map: str | Path | KeyMap | None = None):
    """An eval-mode fp32 TableFreeLM whose parameters ARE the loaded tensors (no second copy)."""
    from .model import TableFreeLM

    cfg, state = load_checkpoint(folder, key_map=key_map)
    with torch.device("meta"):
        model = TableFreeLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# -- writing ---------------------------------------------------------------------------------
def _header_bytes(specs: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple[int, ...]]], produce: Callable[[str], torch.Tensor]) -> None:
    """Stream one safetensors file: header first, then each tensor as `produce(name)` makes it.

    Only one tensor is alive at a time, which is what lets the factory write the 0.5B model in
    about one tensor's memory. Written to a temp name and renamed into place.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_header_bytes(specs))
            for name, dtype, shape in specs:
                t = produce(name)
                if tuple(t.shape) != tuple(shape) or _DTYPE_NAMES[t.dtype] != dtype:
                    raise CheckpointError(f"internal: tensor {name} is {t.dtype} {list(t.shape)}, announced {dtype} {list(shape)}")
                f.write(_tensor_bytes(t))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_weights(folder: Path, specs: list[tuple[str, str, tuple[int, ...]]], produce: Callable[[str], torch.Tensor],
                  shard_size_bytes: int | None = None) -> list[Path]:
    """model.safetensors, or shards of at most shard_size_bytes (one big tensor may exceed it) + index."""
    sizes = [int(np.prod(s, dtype=np.int64)) * _DTYPES[dt].itemsize for _, dt, s in specs]
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
    written: list[Path] = []
    if len(groups) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    for fname, group in zip(names, groups):
        write_safetensors(folder / fname, [specs[i] for i in group], produce)
        written.append(folder / fname)
    index = folder / INDEX_FILE
    if len(groups) > 1:
        weight_map = {specs[i][0]: fname for fname, group in zip(names, groups) for i in group}
        _atomic_write_text(index, json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2) + "\n")
        written.append(index)
    # a previous checkpoint in the same folder must not leave stale weights behind
    for old in list(folder.glob("model*.safetensors")) + [index]:
        if old.exists() and old not in written:
            old.unlink()
    return written


def save_checkpoint(folder: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                    shard_size_bytes: int | None = None) -> None:
    """Write config.json and the canonical tensors (in their own dtypes) as a Hugging Face folder."""
    folder = Path(folder)
    cfg.validate()
    expected = canonical_shapes(cfg)
    wrong = sorted(set(expected) ^ set(state_dict))
    if wrong:
        raise CheckpointError(f"state dict does not match the config's tensors ({', '.join(wrong[:8])}); pass the model's own state_dict")
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, shape in expected.items():
        t = state_dict[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, config implies {list(shape)}; fix the config or the tensor")
        specs.append((name, _DTYPE_NAMES[t.dtype], shape))
    _atomic_write_text(folder / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    write_weights(folder, specs, lambda n: state_dict[n], shard_size_bytes)


__all__ = [
    "CheckpointError",
    "TensorInfo",
    "canonical_shapes",
    "read_header",
    "read_tensor",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "write_safetensors",
    "write_weights",
]
