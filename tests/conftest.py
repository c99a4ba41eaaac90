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
            cache[key] = build(tiny_ckpt, root / f"tiny-{mode}-{precision}", lift_mode=mode, precision=precision,
                               kv_graph=precision != "fp16", log=lambda msg: None)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """V 256 (K 8), d 32, 1 layer: every tensor kind in a few hundred KB, with a generation config and a
    special_tokens_map.json; for tests that damage copies of a checkpoint many times."""
    from reference.config import CodeConfig, tiny_config
    from reference.factory import make_checkpoint
    from reference.lift import random_invertible_gf2

    A, b = random_invertible_gf2(8, seed=3)
    cfg = tiny_config(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, code=CodeConfig(bits=8, A=A, b=b))
    folder = make_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", cfg, seed=1)
    (folder / "special_tokens_map.json").write_text('{"eos_token": "</s>"}\n')
    return folder


@pytest.fixture(scope="session", autouse=True)
def _stamp_cache_in_tmp(tmp_path_factory):
    """runtime.load remembers verified hashes in the user's cache folder; the tests use a temp one."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TABLEFREE_CACHE", str(tmp_path_factory.mktemp("stamp-cache")))
    yield
    mp.undo()
