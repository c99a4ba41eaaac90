"""The name adapter: stored tensor names of foreign checkpoints -> the canonical names of SPEC 2.

Each stored name goes, in this order, through the user's key map, the canonical names (after
stripping torch.compile / DDP prefixes), the name patterns of nanoGPT / Llama / GPT-NeoX, and the
search for the code matrix `A` and offset `b` (U8 tensors of shape [K, K] and [K] under any name).
Whatever is left unmapped stops loading with one error that lists every such tensor.

Key map (`key_map=` in `load_checkpoint`, `--key-map FILE.json` at the CLI): a JSON object
`{"foreign name or regex": "canonical name" | null}`. A key equal to a stored name maps that
tensor; otherwise the key is a Python regular expression that must match the WHOLE stored name,
and the value may use `\\1`-style group references. `null` drops the tensor (e.g. a cached rotary
table). `read_key_map` is the one reader: a file path or a dict, validated the same way.

Besides the SPEC 2 names, two fused targets are accepted: `layers.{i}.attn.qkv_proj.weight` /
`.bias` (q, k and v concatenated along the output features, as nanoGPT's `c_attn`) and
`layers.{i}.attn.qkv_heads.weight` / `.bias` (per head [q, k, v] blocks, as GPT-NeoX's
`query_key_value`); `split_fused` turns them into the canonical q, k, v tensors.
(Config key aliases of the same families live in reference/config.py, beside the fields they name.)
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .safetensors_io import FLOATS, INTEGERS, CheckpointError, TensorInfo, read_json_object

KeyMap = dict[str, "str | None"]
KEY_MAP_HELP = '--key-map FILE.json (a JSON object {"foreign name or regex": "canonical name" or null})'

CANONICAL_RE = re.compile(
    r"code\.[Ab]|lm_head\.weight|embed_tokens\.weight|ln_f\.(weight|bias)"
    r"|layers\.\d+\.(ln1|ln2)\.(weight|bias)"
    r"|layers\.\d+\.attn\.(q|k|v|o|qkv)_proj\.(weight|bias)"
    r"|layers\.\d+\.attn\.qkv_heads\.(weight|bias)"
    r"|layers\.\d+\.mlp\.(up|down)_proj\.(weight|bias)"
)
FUSED_QKV = re.compile(r"layers\.(\d+)\.attn\.(qkv_proj|qkv_heads)\.(weight|bias)")
_BIASES = {
    "attention_bias": re.compile(r"layers\.\d+\.attn\.(q|k|v|o|qkv)_proj\.bias|layers\.\d+\.attn\.qkv_heads\.bias"),
    "mlp_bias": re.compile(r"layers\.\d+\.mlp\.(up|down)_proj\.bias"),
    "norm_bias": re.compile(r"(layers\.\d+\.ln[12]|ln_f)\.bias"),
}

# Built-in adapters: (regex on the stored name, canonical template or None to drop).
PATTERNS: list[tuple[re.Pattern[str], str | None]] = [
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
STRIP_PREFIXES = ("_orig_mod.", "module.")
# Names under which A / b are plausibly stored (last name component A, code_A, affine_A, ...).
_A_NAME = re.compile(r"(?:.*[._])?(?:code_|affine_|recode_)?A")
_B_NAME = re.compile(r"(?:.*[._])?(?:code_|affine_|recode_)?b")


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every SPEC 2 tensor this config needs, in the model's state_dict order, with its shape."""
    d, f, V, K = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.code.bits
    out: dict[str, tuple[int, ...]] = {"code.A": (K, K), "code.b": (K,)}

    def add(prefix: str, shape: tuple[int, ...], bias: bool) -> None:
        out[f"{prefix}.weight"] = shape
        if bias:
            out[f"{prefix}.bias"] = shape[:1]

    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        add(f"{p}.ln1", (d,), cfg.norm_bias)
        for n in "qkvo":
            add(f"{p}.attn.{n}_proj", (d, d), cfg.attention_bias)
        if cfg.has_ln2:
            add(f"{p}.ln2", (d,), cfg.norm_bias)
        add(f"{p}.mlp.up_proj", (f, d), cfg.mlp_bias)
        add(f"{p}.mlp.down_proj", (d, f), cfg.mlp_bias)
    add("ln_f", (d,), cfg.norm_bias)
    out["lm_head.weight"] = (V, d)
    if cfg.input_table:  # the learned-input-table baseline (lift mode "table")
        out["embed_tokens.weight"] = (V, d)
    return out


# -- the key map -------------------------------------------------------------------------------
def read_key_map(key_map: str | os.PathLike | dict | None) -> KeyMap:
    """The one key-map reader: a JSON file or a dict, checked the same way (values str or null, keys
    valid regular expressions); any fault is one CheckpointError naming the key and the file."""
    if key_map is None:
        return {}
    source = "key map" if isinstance(key_map, dict) else f"{key_map}"
    data: Any = key_map if isinstance(key_map, dict) else read_json_object(Path(key_map), f"pass {KEY_MAP_HELP}")
    for key, value in data.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, str)):
            raise CheckpointError(f"{source}: entry {key!r}: {value!r} must map a name to a canonical name or null; "
                                  f"a key map is {KEY_MAP_HELP.split(' ', 1)[1]}")
        try:
            re.compile(key)
        except (re.error, RecursionError, OverflowError) as e:
            raise CheckpointError(f"{source}: key {key!r} is not a valid regular expression ({e}); "
                                  "escape it (re.escape) or fix the pattern") from None
    return dict(data)


class NameMap:
    """Stored name -> (matched, canonical target or None to drop), in the order of the module doc."""

    def __init__(self, key_map: KeyMap):
        self.exact = key_map
        self.compiled = [(re.compile(k), v) for k, v in key_map.items()]

    def resolve(self, name: str) -> tuple[bool, str | None]:
        if name in self.exact:
            return True, self.exact[name]
        hit = _first_match(self.compiled, name)
        if hit is not None:
            return hit
        stripped = name
        for prefix in STRIP_PREFIXES:
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix):]
        if CANONICAL_RE.fullmatch(stripped):
            return True, stripped
        return _first_match(PATTERNS, stripped) or (False, None)


def _first_match(patterns: list[tuple[re.Pattern[str], str | None]], name: str) -> tuple[bool, str | None] | None:
    for pat, target in patterns:
        m = pat.fullmatch(name)
        if m:
            try:
                return True, None if target is None else m.expand(target)
            except (re.error, IndexError) as e:
                raise CheckpointError(f"key map: target {target!r} for '{name}' has a bad group reference ({e}); "
                                      "fix the key map") from None
    return None


# -- mapping a folder's tensors ----------------------------------------------------------------
def map_tensors(infos: dict[str, TensorInfo], key_map: KeyMap, code_bits: int, folder: Path) -> dict[str, TensorInfo]:
    """canonical (or fused) name -> stored tensor; the code A/b found by name or shape; none left over."""
    names = NameMap(key_map)
    mapped: dict[str, TensorInfo] = {}
    unmapped: list[TensorInfo] = []
    for name, info in infos.items():
        ok, target = names.resolve(name)
        if not ok:
            unmapped.append(info)
            continue
        if target is None:
            continue
        if not CANONICAL_RE.fullmatch(target):
            raise CheckpointError(f"key map sends '{name}' to '{target}', which is not a canonical tensor name (SPEC 2); fix the key map")
        if target in mapped:
            raise CheckpointError(f"{info.file}: both '{mapped[target].name}' and '{name}' map to '{target}'; fix the key map")
        mapped[target] = info
    K = code_bits
    for key, shape, by_name in (("code.A", (K, K), _A_NAME), ("code.b", (K,), _B_NAME)):
        if key in mapped:
            continue
        named = [t for t in unmapped if by_name.fullmatch(t.name) and t.shape == shape]
        found = named or [t for t in unmapped if t.dtype in ("U8", "BOOL") and t.shape == shape]
        if len(found) > 1:
            raise CheckpointError(f"{found[0].file}: several candidates for {key} ({', '.join(t.name for t in found)}); "
                                  "name the right one with --key-map FILE.json")
        if found:
            mapped[key] = found[0]
            unmapped.remove(found[0])
    if unmapped:
        listed = ", ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in unmapped)
        raise CheckpointError(f"{folder}: {len(unmapped)} tensor(s) we cannot map to the model: {listed}. "
                              f"Map them by hand with {KEY_MAP_HELP}")
    return mapped


def detect_biases(cfg: ModelConfig, names: set[str]) -> None:
    """Bias flags, an input table and a one-norm block come from the weights, not from the config."""
    for flag, pattern in _BIASES.items():
        setattr(cfg, flag, any(pattern.fullmatch(n) for n in names))
    cfg.input_table = "embed_tokens.weight" in names  # the learned-table baseline, recognised by its table
    if not any(".ln2." in n for n in names) and any(".ln1." in n for n in names):
        cfg.parallel_residual, cfg.parallel_norms = True, 1  # one norm per block: GPT-J's parallel layout


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


def check_mapped(cfg: ModelConfig, mapped: dict[str, TensorInfo], config_path: Path) -> None:
    """Layer count, shapes and dtypes from the headers against the config; nothing canonical missing."""
    layers = {int(m.group(1)) for n in mapped if (m := re.match(r"layers\.(\d+)\.", n))}
    if layers and max(layers) + 1 != cfg.num_hidden_layers:
        raise CheckpointError(f"{config_path}: num_hidden_layers = {cfg.num_hidden_layers} but the weights hold "
                              f"{max(layers) + 1} layers; fix config.json so its sizes match the weights")
    expected = canonical_shapes(cfg)
    d = cfg.hidden_size
    covered = set(mapped)
    for target, info in mapped.items():
        fused = FUSED_QKV.fullmatch(target)
        want = ((3 * d, d) if fused.group(3) == "weight" else (3 * d,)) if fused else expected.get(target)
        if fused:
            covered |= {f"layers.{fused.group(1)}.attn.{n}_proj.{fused.group(3)}" for n in "qkv"}
        if want is None:  # e.g. a bias tensor of a kind the rest of the model lacks
            raise CheckpointError(f"{info.file}: tensor '{info.name}' ({target}) does not fit this model; drop it with a "
                                  "--key-map FILE.json entry mapping it to null")
        if info.shape != want:
            raise CheckpointError(
                f"{config_path}: sizes disagree with {info.file.name}: tensor '{info.name}' ({target}) has shape "
                f"{list(info.shape)}, config implies {list(want)} (hidden_size={cfg.hidden_size}, "
                f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size}){_size_hint(cfg, mapped)}; "
                "fix config.json so its sizes match the weights")
        if target in ("code.A", "code.b"):
            if info.dtype not in INTEGERS:
                raise CheckpointError(f"{info.file}: tensor '{info.name}' ({target}) has dtype {info.dtype}; the code A and b "
                                      "are GF(2) values and must be stored as uint8 0/1 (convert with .to(torch.uint8))")
        elif info.dtype not in FLOATS:
            raise CheckpointError(f"{info.file}: tensor '{info.name}' ({target}) has dtype {info.dtype}; store weights as F32, F16 or BF16")
    missing = [n for n in expected if n not in covered and n not in ("code.A", "code.b")]
    if missing:
        first = next(iter(mapped.values()), None)
        where = first.file if first is not None else config_path.parent
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{where}: missing tensor(s) {shown}; the checkpoint is incomplete: re-download or re-write it")


def split_fused(target: str, t: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A canonical tensor as itself, or a fused qkv tensor as its q, k and v pieces."""
    m = FUSED_QKV.fullmatch(target)
    if m is None:
        return {target: t}
    i, kind, part = m.groups()
    if kind == "qkv_heads":  # [heads, (q, k, v), head_size, ...] -> [(q, k, v), heads * head_size, ...]
        h, hs = cfg.num_attention_heads, cfg.head_size
        t = t.reshape(h, 3, hs, *t.shape[1:]).transpose(0, 1).reshape(3 * cfg.hidden_size, *t.shape[1:])
    return {f"layers.{i}.attn.{n}_proj.{part}": piece.contiguous() for n, piece in zip("qkv", t.chunk(3, dim=0))}


__all__ = ["KeyMap", "CANONICAL_RE", "FUSED_QKV", "PATTERNS", "canonical_shapes", "read_key_map", "NameMap",
           "map_tensors", "detect_biases", "check_mapped", "split_fused"]
