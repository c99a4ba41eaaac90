"""Model and code configuration: the one place that knows config.json keys and their aliases.

Plain dataclasses (no torch) so that checkpoint tooling, the exporter and tests can read a
config without loading weights. Every convention the paper leaves open is a field here and is
recorded in every artifact.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

BIT_ORDERS = ("lsb_first", "msb_first")
VALUE_MAPS = ("zero_one", "plus_minus_one")
TILINGS = ("repeat", "interleave")
NORM_TYPES = ("layernorm", "rmsnorm")
ROPE_PAIRINGS = ("rotate_half", "interleaved")
ACTIVATIONS = ("gelu", "gelu_tanh")
PARALLEL_NORMS = (1, 2)  # parallel residual: one norm feeds both branches (GPT-J) or one each (GPT-NeoX)
# fraction-of-head spellings of the rotary width (GPT-NeoX rotary_pct, HF partial_rotary_factor)
_ROTARY_FRACTIONS = ("rotary_pct", "partial_rotary_factor")

# Foreign config keys -> our keys. nanoGPT, GPT-2, Llama/NeoX and the author's own spellings.
CONFIG_ALIASES: dict[str, str] = {
    "n_embd": "hidden_size",
    "n_embed": "hidden_size",
    "d_model": "hidden_size",
    "dim": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_layers": "num_hidden_layers",
    "num_layers": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_heads": "num_attention_heads",
    "num_heads": "num_attention_heads",
    "block_size": "max_position_embeddings",
    "n_positions": "max_position_embeddings",
    "n_ctx": "max_position_embeddings",
    "context_length": "max_position_embeddings",
    "n_inner": "intermediate_size",
    "ffn_dim": "intermediate_size",
    "vocab": "vocab_size",
    "n_vocab": "vocab_size",
    "layer_norm_epsilon": "layer_norm_eps",
    "norm_eps": "layer_norm_eps",
    "rms_norm_eps": "layer_norm_eps",
    "rotary_base": "rope_theta",
    "rope_base": "rope_theta",
    "rotary_emb_base": "rope_theta",  # GPT-NeoX
    "use_parallel_residual": "parallel_residual",  # GPT-NeoX
    "parallel_attn": "parallel_residual",  # Falcon
    "activation_function": "hidden_act",
}

_ACT_ALIASES = {
    "gelu": "gelu",
    "gelu_exact": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


class ConfigError(ValueError):
    """A config that cannot describe a model we can build; the message names the field and the fix."""


MAX_INT = 1 << 31  # no size of a model we can build reaches it; bigger values are typos


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_int(name: str, value: Any, low: int = 1, high: int = MAX_INT) -> None:
    """A JSON integer (not 65536.0, "65536" or true) in [low, high]."""
    if not _is_int(value):
        raise ConfigError(f"{name} = {value!r} must be an integer (e.g. {name} = {max(low, 1)}), "
                          f"not {type(value).__name__}; fix config.json")
    if not low <= value <= high:
        raise ConfigError(f"{name} = {value} must be in [{low}, {high}]; fix config.json")


def check_real(name: str, value: Any, positive: bool = True, nonzero: bool = True) -> None:
    """A finite JSON number; > 0 when `positive`, != 0 when `nonzero`."""
    if not _is_real(value):
        raise ConfigError(f"{name} = {value!r} must be a number, not {type(value).__name__}; fix config.json")
    if not math.isfinite(value) or (positive and value <= 0) or (nonzero and value == 0):
        need = "a finite number > 0" if positive else "a finite non-zero number" if nonzero else "a finite number"
        raise ConfigError(f"{name} = {value} must be {need}; fix config.json")


def code_width(vocab_size: int) -> int:
    """K = ceil(log2 V): the number of bits that names every token id."""
    return max(1, math.ceil(math.log2(vocab_size)))


@dataclass
class CodeConfig:
    """The fixed token code ("lift", SPEC 1.1). `A`/`b` default to the identity recoding."""

    bits: int = 16
    bit_order: str = "lsb_first"
    values: str = "zero_one"
    tiling: str = "repeat"
    scale: float = 1.0
    A: np.ndarray | None = field(default=None, repr=False)
    b: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if _is_int(self.bits):
            self.bits = int(self.bits)  # a numpy integer would not serialise to config.json
        K = self.bits if _is_int(self.bits) and 1 <= self.bits <= 64 else 1  # validate() names a bad bits
        self.A = np.eye(K, dtype=np.uint8) if self.A is None else _bits_array("code A", self.A)
        self.b = np.zeros(K, dtype=np.uint8) if self.b is None else _bits_array("code b", self.b)

    def validate(self) -> None:
        check_int("code.bits", self.bits, 1, 64)
        check_real("code.scale", self.scale, positive=False)
        for name, value, allowed in (
            ("bit_order", self.bit_order, BIT_ORDERS),
            ("values", self.values, VALUE_MAPS),
            ("tiling", self.tiling, TILINGS),
        ):
            if value not in allowed:
                raise ConfigError(f"code.{name} = {value!r} is not one of {allowed}; fix config.json or the override")
        K = self.bits
        if self.A.shape != (K, K):
            raise ConfigError(f"code A has shape {tuple(self.A.shape)}, expected [{K}, {K}] (code.bits = {K})")
        if self.b.shape != (K,):
            raise ConfigError(f"code b has shape {tuple(self.b.shape)}, expected [{K}] (code.bits = {K})")
        if np.any(self.A > 1) or np.any(self.b > 1):
            raise ConfigError("code A and b must hold only 0 and 1 (they are over GF(2))")
        rank = gf2_rank(self.A)
        if rank != K:
            raise ConfigError(
                f"code A is singular over GF(2) (rank {rank} < {K}): distinct tokens would share a code. "
                "Use an invertible A (for example reference.lift.random_invertible_gf2)"
            )

    def to_dict(self, with_matrix: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "bits": self.bits,
            "bit_order": self.bit_order,
            "values": self.values,
            "tiling": self.tiling,
            "scale": float(self.scale),
        }
        if with_matrix:
            d["A"] = self.A.astype(int).tolist()
            d["b"] = self.b.astype(int).tolist()
        return d


def _bits_array(name: str, value: Any) -> np.ndarray:
    """A or b from config.json or the weights: integers 0/1 only (a ragged list or 0.5 is refused)."""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise ConfigError(f"{name} is not a rectangular array of 0/1; fix config.json") from None
    if arr.dtype == object or not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)) or arr.size and (
            arr.min() < 0 or arr.max() > 1):
        raise ConfigError(f"{name} must hold only the integers 0 and 1 (it is over GF(2)); fix config.json")
    return arr.astype(np.uint8)


def gf2_rank(A: np.ndarray) -> int:
    """Rank over GF(2) by Gaussian elimination with XOR; the test that A is invertible."""
    M = (np.asarray(A).astype(np.uint8) & 1).copy()
    rows, cols = M.shape
    rank = 0
    for c in range(cols):
        pivot = next((r for r in range(rank, rows) if M[r, c]), None)
        if pivot is None:
            continue
        M[[rank, pivot]] = M[[pivot, rank]]
        for r in range(rows):
            if r != rank and M[r, c]:
                M[r] ^= M[rank]
        rank += 1
        if rank == rows:
            break
    return rank


@dataclass
class ModelConfig:
    """The architecture (SPEC 1.2). Unpublished choices of the real checkpoint are fields."""

    vocab_size: int = 65536
    hidden_size: int = 1024
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    norm_type: str = "layernorm"
    rope_pairing: str = "rotate_half"
    attention_bias: bool = True
    mlp_bias: bool = True
    norm_bias: bool = True
    # block variants of the published decoders (defaults: the seed's sequential pre-LN, full rotary)
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln(x)) instead of h = x + attn; h + mlp(ln2(h))
    parallel_norms: int = 2  # with parallel_residual: 2 = the MLP reads ln2(x) (NeoX), 1 = ln1(x) (GPT-J, no ln2)
    rotary_dim: int | None = None  # RoPE on the first rotary_dim features of each head; None = the whole head
    # the input vector is a row of a learned [V, d] table (embed_tokens.weight), not the code: the
    # paper's learned-input-table baseline, exported with lift mode "table" for comparison
    input_table: bool = False
    code: CodeConfig = field(default_factory=CodeConfig)
    bos_token_id: int | None = 57345
    eos_token_id: int | None = 57346
    pad_token_id: int | None = 57344
    model_type: str = "tablefree"

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.hidden_act = _ACT_ALIASES.get(str(self.hidden_act), str(self.hidden_act))

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """How many features of each head RoPE rotates (rotary_dim, or the whole head)."""
        return self.head_size if self.rotary_dim is None else int(self.rotary_dim)

    @property
    def has_ln2(self) -> bool:
        """Whether blocks hold a second norm (all but the one-norm parallel residual)."""
        return not (self.parallel_residual and self.parallel_norms == 1)

    def validate(self) -> None:
        """Refuse configs that no model could follow, before any weight is read: types, then ranges."""
        check_int("vocab_size", self.vocab_size, 2)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            check_int(name, getattr(self, name))
        check_int("max_position_embeddings", self.max_position_embeddings, 1, 1 << 24)
        check_real("rope_theta", self.rope_theta)
        check_real("layer_norm_eps", self.layer_norm_eps)
        for name in ("attention_bias", "mlp_bias", "norm_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} = {getattr(self, name)!r} must be true or false; fix config.json")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            for tid in value if isinstance(value, list) and name == "eos_token_id" else [value]:
                if tid is not None:
                    check_int(name, tid, 0, self.vocab_size - 1)
        self.code.validate()
        need = code_width(self.vocab_size)
        if self.code.bits < need:
            raise ConfigError(f"code.bits = {self.code.bits} cannot name {self.vocab_size} tokens; need >= {need}; fix config.json")
        if self.hidden_size % self.code.bits:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of code.bits {self.code.bits}; the code cannot tile it; fix config.json"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}; fix config.json")
        if self.head_size % 2:
            raise ConfigError(f"head size {self.head_size} is odd; rotary embeddings need an even head size; fix config.json")
        for name, value, allowed in (
            ("hidden_act", self.hidden_act, ACTIVATIONS),
            ("norm_type", self.norm_type, NORM_TYPES),
            ("rope_pairing", self.rope_pairing, ROPE_PAIRINGS),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} = {value!r} is not one of {allowed}; fix config.json")
        self._validate_variants()

    def _validate_variants(self) -> None:
        if not isinstance(self.parallel_residual, bool):
            raise ConfigError(f"parallel_residual = {self.parallel_residual!r} must be true or false")
        if self.parallel_norms not in PARALLEL_NORMS:
            raise ConfigError(f"parallel_norms = {self.parallel_norms!r} is not one of {PARALLEL_NORMS} "
                              "(1: GPT-J style, one norm feeds both branches; 2: GPT-NeoX style)")
        if self.rotary_dim is not None:
            rd = self.rotary_dim
            if isinstance(rd, bool) or not isinstance(rd, int) or not 2 <= rd <= self.head_size or rd % 2:
                raise ConfigError(f"rotary_dim = {rd!r} must be an even integer in 2..{self.head_size} (the head size); "
                                  "fix config.json (rotary_pct / partial_rotary_factor give it as a fraction)")
        if not isinstance(self.input_table, bool):
            raise ConfigError(f"input_table = {self.input_table!r} must be true or false")

    # -- config.json --------------------------------------------------------------------------
    def to_dict(self, with_matrix: bool = False) -> dict[str, Any]:
        """config.json content. A/b live in the weights as code.A/code.b unless asked for."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "code"}
        d["code"] = self.code.to_dict(with_matrix=with_matrix)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Read our config.json or a foreign one (aliases mapped; unknown keys ignored)."""
        d = {k: v for k, v in raw.items() if k not in CONFIG_ALIASES}
        for key, value in raw.items():  # our own spelling wins over an alias
            if key in CONFIG_ALIASES:
                d.setdefault(CONFIG_ALIASES[key], value)
        code_raw = d.pop("code", None) or {}
        if not isinstance(code_raw, dict):
            raise ConfigError(f"code = {code_raw!r} must be an object (bits, bit_order, values, tiling, scale); fix config.json")
        code_raw = dict(code_raw)
        for k in ("A", "b"):  # some foreign configs hold the recoding at the top level
            for cand in (k, f"code_{k}", f"affine_{k}"):
                if cand in raw and k not in code_raw:
                    code_raw[k] = raw[cand]
        code_fields = {f.name for f in fields(CodeConfig)}
        code_kwargs = {k: v for k, v in code_raw.items() if k in code_fields}
        if "bits" not in code_kwargs and _is_int(d.get("vocab_size")) and d["vocab_size"] >= 2:
            code_kwargs["bits"] = code_width(int(d["vocab_size"]))
        known = {f.name for f in fields(cls)} - {"code"}
        kwargs = {k: v for k, v in d.items() if k in known}
        cfg = cls(code=CodeConfig(**code_kwargs), **kwargs)
        fraction = next((raw[k] for k in _ROTARY_FRACTIONS if raw.get(k) is not None), None)
        if cfg.rotary_dim is None and fraction is not None:
            try:  # GPT-NeoX: rotary_ndims = int(head_size * rotary_pct)
                rd = int(cfg.head_size * float(fraction))
            except (TypeError, ValueError, ZeroDivisionError):
                raise ConfigError(f"rotary fraction {fraction!r} is not a number in (0, 1]; fix config.json") from None
            cfg.rotary_dim = None if rd == cfg.head_size else rd
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; a checkpoint folder needs one (Hugging Face layout)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); fix or regenerate the file") from None
        return cls.from_dict(raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small model of the seed's family (V = 65,536 so K = 16): the size tests use."""
    code_over = overrides.pop("code", None)
    base = dict(
        vocab_size=65536,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
    )
    base.update(overrides)
    cfg = ModelConfig(**base)
    if code_over is not None:
        cfg.code = code_over if isinstance(code_over, CodeConfig) else CodeConfig(**code_over)
    return cfg


def full_config() -> ModelConfig:
    """The published seed shape: V 65,536, d 1024, 32 layers, 32 heads, context 1024."""
    return ModelConfig()


__all__ = [
    "CodeConfig",
    "ModelConfig",
    "ConfigError",
    "gf2_rank",
    "code_width",
    "tiny_config",
    "full_config",
]
