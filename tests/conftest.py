"""Shared fixtures: tiny checkpoints and the bvv241 tokenizer, built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from reference.data import MissingDataError


@pytest.fixture(scope="session")
def bvv241_dir(tmp_path_factory) -> Path:
    """A folder with the bvv241-2-3 tokenizer files (SPEC 4), built from ../shared/data."""
    from reference.tokenizer import build_bvv241, save_tokenizer

    try:
        tok = build_bvv241()
    except MissingDataError as e:
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("bvv241")
    save_tokenizer(tok, folder)
    return folder


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
            cache[key] = build(tiny_ckpt, root / f"tiny-{mode}-{precision}", lift_mode=mode, precision=precision,
                               kv_graph=precision != "fp16", log=lambda msg: None)
        return cache[key]

    return get
