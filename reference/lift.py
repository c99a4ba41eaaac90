"""The token code ("lift", SPEC 1.1) in torch: the one definition every other check compares with.

A token id becomes K bits, the bits are recoded by an invertible affine map over GF(2), mapped to
values and tiled to the model width. Nothing here is a V x d table; the whole code is A, b and
four convention strings.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import CodeConfig, gf2_rank


def token_bits(ids: torch.Tensor, bits: int, bit_order: str = "lsb_first") -> torch.Tensor:
    """[...] int ids -> [..., K] int64 bits c_i = (t >> i) & 1 (reversed for msb_first)."""
    shifts = torch.arange(bits, device=ids.device, dtype=torch.int64)
    if bit_order == "msb_first":
        shifts = shifts.flip(0)
    return (ids.to(torch.int64).unsqueeze(-1) >> shifts) & 1


def recode(bits: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c~ = (A c + b) mod 2, computed in int64 so it is exact."""
    return (bits @ A.to(torch.int64).T + b.to(torch.int64)) % 2


def code_values(recoded: torch.Tensor, code: CodeConfig) -> torch.Tensor:
    v = recoded.to(torch.float32)
    if code.values == "plus_minus_one":
        v = 2.0 * v - 1.0
    return v * float(code.scale)


def tile(v: torch.Tensor, width: int, tiling: str) -> torch.Tensor:
    """[..., K] -> [..., width]: repeat gives x[j] = v[j mod K]; interleave x[j] = v[j div (width/K)]."""
    K = v.shape[-1]
    reps = width // K
    if tiling == "repeat":
        return v.repeat(*([1] * (v.dim() - 1)), reps)
    return v.repeat_interleave(reps, dim=-1)


def lift(ids: torch.Tensor, code: CodeConfig, width: int, A: torch.Tensor | None = None,
         b: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [...] -> input vectors [..., width] float32. A/b override code.A/code.b (buffers)."""
    A = torch.as_tensor(code.A) if A is None else A
    b = torch.as_tensor(code.b) if b is None else b
    bits = token_bits(ids, code.bits, code.bit_order)
    return tile(code_values(recode(bits, A, b), code), width, code.tiling)


def recoded_codes(code: CodeConfig, vocab_size: int) -> np.ndarray:
    """The recoded K-bit code of every id as an integer (bit i of the result is c~_i).

    This is the lookup-mode table (V * K bits) and the injectivity check in one place.
    """
    ids = torch.arange(vocab_size, dtype=torch.int64)
    rec = recode(token_bits(ids, code.bits, code.bit_order), torch.as_tensor(code.A), torch.as_tensor(code.b))
    weights = (1 << torch.arange(code.bits, dtype=torch.int64))
    return (rec * weights).sum(-1).numpy()


def random_invertible_gf2(bits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random invertible A and random b: the recoding the demo model and tests use."""
    rng = np.random.default_rng(seed)
    while True:
        A = rng.integers(0, 2, size=(bits, bits), dtype=np.uint8)
        if gf2_rank(A) == bits:
            return A, rng.integers(0, 2, size=bits, dtype=np.uint8)
