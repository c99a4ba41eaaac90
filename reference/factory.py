"""Checkpoint factory: folders of any size and convention with seeded random weights.

Tests need tiny checkpoints of the seed's family; benchmarks need the full 0.5B shape without
downloading anything. Each tensor is generated from its own seed (the run seed and the tensor's
name), written, and dropped before the next one exists, so memory stays near one tensor even for
the full model, and a tensor's values do not depend on the dtype, sharding or order of writing.

Initialisation (why these numbers): linear weights have std 0.5/sqrt(fan_in) (0.016 at d = 1024,
the usual ~0.02, and well-conditioned at test sizes too), biases std 0.02 (non-zero so bias
handling is exercised), norm weights 1 + N(0, 0.05^2), and `lm_head` std 2/sqrt(d) with each row
scaled by exp(N(0, 0.3^2)) so that logits spread by about 2 and a few rows stand out: random
models then have clear top-1 choices (measured at d 64: median top-1/top-2 gap 6% of the largest
|logit|, 1st percentile 1e-3, against 3.6% and 6e-4 for plain Gaussian rows) instead of
near-uniform, tie-prone distributions.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path

import torch

from runtime.interface import CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILES

from .adapter import canonical_shapes
from .checkpoint import generation_config
from .safetensors_io import DTYPE_NAMES, CheckpointError, atomic_write, atomic_write_text, write_weights
from .config import CodeConfig, ModelConfig, full_config, tiny_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_seed(seed: int, name: str) -> int:
    """One seed per tensor, from the run seed and the tensor's name."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % (1 << 63)


def random_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fp32 value of one canonical tensor (code.A / code.b come from the config, as uint8)."""
    if name == "code.A":
        return torch.as_tensor(cfg.code.A, dtype=torch.uint8).clone()
    if name == "code.b":
        return torch.as_tensor(cfg.code.b, dtype=torch.uint8).clone()
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    t = torch.empty(shape, dtype=torch.float32)
    is_norm = name.startswith("ln_f.") or ".ln1." in name or ".ln2." in name
    if is_norm and name.endswith(".weight"):
        return t.normal_(0.0, 0.05, generator=g).add_(1.0)
    if name.endswith(".bias"):
        return t.normal_(0.0, 0.02, generator=g)
    if name == "lm_head.weight":  # rows with log-normal norms: clearer winners, fewer near-ties
        row_scale = torch.empty(shape[0], 1).normal_(0.0, 0.3, generator=g).exp_()
        return t.normal_(0.0, 2.0 / math.sqrt(cfg.hidden_size), generator=g).mul_(row_scale)
    return t.normal_(0.0, 0.5 / math.sqrt(shape[1]), generator=g)


def make_checkpoint(folder: str | Path, cfg: ModelConfig, seed: int = 0, dtype: str = "float32",
                    shard_size_bytes: int | None = None, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a complete checkpoint folder (config, weights, generation config, tokenizer) and return it."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}; pick one of them")
    cfg.validate()
    folder = Path(folder)
    if tokenizer_dir is not None and not (Path(tokenizer_dir) / TOKENIZER_FILES[0]).is_file():
        raise CheckpointError(f"{Path(tokenizer_dir) / TOKENIZER_FILES[0]}: missing; pass a folder that holds the tokenizer files")
    folder.mkdir(parents=True, exist_ok=True)
    shapes = canonical_shapes(cfg)
    torch_dtype = DTYPES[dtype]
    specs = [(n, "U8" if n.startswith("code.") else DTYPE_NAMES[torch_dtype], s) for n, s in shapes.items()]

    def produce(name: str) -> torch.Tensor:
        t = random_tensor(cfg, name, shapes[name], seed)
        return t if name.startswith("code.") else t.to(torch_dtype)

    config = cfg.to_dict()
    config["torch_dtype"] = dtype
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    write_weights(folder, specs, produce, shard_size_bytes)
    atomic_write_text(folder / GENERATION_CONFIG_FILE, json.dumps(generation_config(cfg), indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                atomic_write(folder / name, lambda f, src=src: f.write(src.read_bytes()))
    return folder


def main(argv: list[str] | None = None) -> int:
    from .lift import random_invertible_gf2

    p = argparse.ArgumentParser(
        prog="python -m reference.factory",
        description="Write a checkpoint folder with seeded random weights: tiny (tests) or the full 0.5B seed shape "
                    "(32 layers, d 1024, V 65,536). The code uses a seeded random invertible A and random b.",
    )
    p.add_argument("--out", required=True, help="folder to write (created; existing weight files are replaced)")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny", help="tiny: d 64, 2 layers; full: the seed's shape")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of A/b (default 0)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="stored dtype of the float tensors")
    p.add_argument("--shard-size", type=int, default=None, metavar="BYTES", help="write shards of at most BYTES plus an index")
    p.add_argument("--tokenizer-dir", default=None, help="copy tokenizer.json and its configs from this folder")
    p.add_argument("--input-table", action="store_true",
                   help="the learned-input-table sibling: an embed_tokens.weight [V, d] table instead of the code "
                        "(every other tensor equal to the table-free checkpoint of the same seed)")
    args = p.parse_args(argv)
    A, b = random_invertible_gf2(16, seed=args.seed)
    cfg = tiny_config() if args.size == "tiny" else full_config()
    cfg.code = CodeConfig(bits=cfg.code.bits, A=A, b=b)
    cfg.input_table = args.input_table
    try:
        out = make_checkpoint(args.out, cfg, seed=args.seed, dtype=args.dtype, shard_size_bytes=args.shard_size,
                              tokenizer_dir=args.tokenizer_dir)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
