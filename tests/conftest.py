"""Shared fixtures: the committed bvv241 tokenizer and tiny checkpoints built from it once per session."""
from __future__ import annotations

from pathlib import Path

import pytest



@pytest.fixture(scope="session")
def bvv241_dir() -> Path:
    """The committed bvv241-2-3 tokenizer files (SPEC 4); read-only, copy before writing next to them."""
    from reference.tokenizer import BVV241_DIR

    return BVV241_DIR


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, bvv241_dir) -> Path:
    """A tiny checkpoint of the seed family: V 65,536, non-identity A, non-zero b, tokenizer files."""
    from reference.config import CodeConfig, tiny_config
    from reference.factory import make_checkpoint
    from reference.lift import random_invertible_gf2

    A, b = random_invertible_gf2(16, seed=1)
    cfg = tiny_config(code=CodeConfig(A=A, b=b))
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", cfg, seed=0, tokenizer_dir=bvv241_dir)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_ckpt):
    """`get(mode="bitwise", precision="fp32") -> Path`: a verified artifact of `tiny_ckpt`, built once per session."""
    from export.build import build

    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple[str, str], Path] = {}

    def get(mode: str = "bitwise", precision: str = "fp32") -> Path:
        key = (mode, precision)
        if key not in cache:
            cache[key] = build(tiny_ckpt, root / f"tiny-{mode}-{precision}", code=mode, precision=precision,
                               log=lambda msg: None)
        return cache[key]

    return get
