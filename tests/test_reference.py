"""The torch reference against an independent numpy reading of SPEC 1-2 written here.

The numpy model below is written from the SPEC text, in float64, and calls no project code; the
only thing it shares with the reference is the weights (data). If both agree to 1e-5 on every
convention, the reference is what the SPEC says, and every later parity check inherits that.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from reference.config import CodeConfig, ConfigError, gf2_rank, tiny_config
from reference.generate import filter_logits, generate, sample_token
from reference.lift import lift, random_invertible_gf2
from reference.model import TableFreeLM

V, K = 65536, 16
TOL = 1e-5


# -- the numpy oracle (SPEC 1.1, 1.2) ---------------------------------------------------------
def np_lift(ids: np.ndarray, A: np.ndarray, b: np.ndarray, bit_order: str, values: str, tiling: str,
            scale: float, width: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    k = A.shape[0]
    if bit_order == "lsb_first":
        bits = np.stack([(ids >> i) & 1 for i in range(k)], axis=-1)
    else:
        bits = np.stack([(ids >> (k - 1 - i)) & 1 for i in range(k)], axis=-1)
    rec = (bits @ A.astype(np.int64).T + b.astype(np.int64)) % 2
    v = rec.astype(np.float64)
    if values == "plus_minus_one":
        v = 2 * v - 1
    v = v * scale
    if tiling == "repeat":
        cols = [j % k for j in range(width)]
    else:
        cols = [j // (width // k) for j in range(width)]
    return v[..., cols]


def np_norm(x, w, b, kind, eps):
    if kind == "layernorm":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + eps) * w
    else:
        y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w
    return y if b is None else y + b


def np_rope(x, pos, theta, pairing):
    """x [B, H, S, hs], pos [B, S]."""
    hs = x.shape[-1]
    inv = theta ** (-np.arange(0, hs, 2) / hs)
    ang = pos[:, None, :, None].astype(np.float64) * inv  # [B, 1, S, hs/2]
    c, s = np.cos(ang), np.sin(ang)
    if pairing == "rotate_half":
        x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    out = np.empty_like(x)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


_erf = np.vectorize(math.erf)


def np_gelu(x, act):
    if act == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def np_forward(W: dict, c: dict, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [B, S, V] of the SPEC model; c holds the config fields as plain values."""
    B, S = ids.shape
    d, H = c["d"], c["heads"]
    hs = d // H
    mask = np.ones((B, S), dtype=np.int64) if mask is None else mask
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    x = np_lift(ids, W["code.A"], W["code.b"], c["bit_order"], c["values"], c["tiling"], c["scale"], d)

    def lin(h, name):
        y = h @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def norm(h, name):
        return np_norm(h, W[name + ".weight"], W.get(name + ".bias"), c["norm"], 1e-5)

    allowed = (np.arange(S)[None, :] <= np.arange(S)[:, None])[None] & (mask[:, None, :] == 1)  # [B, S, S]
    for i in range(c["layers"]):
        p = f"layers.{i}"
        h = norm(x, f"{p}.ln1")
        q, k, v = (lin(h, f"{p}.attn.{n}_proj").reshape(B, S, H, hs).transpose(0, 2, 1, 3) for n in "qkv")
        q, k = np_rope(q, pos, c["theta"], c["pairing"]), np_rope(k, pos, c["theta"], c["pairing"])
        sc = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
        sc = np.where(allowed[:, None], sc, -1e30)
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        att = (sc / sc.sum(-1, keepdims=True)) @ v
        x = x + lin(att.transpose(0, 2, 1, 3).reshape(B, S, d), f"{p}.attn.o_proj")
        x = x + lin(np_gelu(lin(norm(x, f"{p}.ln2"), f"{p}.mlp.up_proj"), c["act"]), f"{p}.mlp.down_proj")
    return norm(x, "ln_f") @ W["lm_head.weight"].T


# -- helpers ------------------------------------------------------------------------------------
def random_model(cfg, seed: int = 0) -> TableFreeLM:
    """A reference model with weights large enough that every part of the block matters."""
    model = TableFreeLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("ln" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def oracle_config(cfg) -> dict:
    return dict(d=cfg.hidden_size, heads=cfg.num_attention_heads, layers=cfg.num_hidden_layers,
                bit_order=cfg.code.bit_order, values=cfg.code.values, tiling=cfg.code.tiling,
                scale=cfg.code.scale, norm=cfg.norm_type, theta=cfg.rope_theta, pairing=cfg.rope_pairing,
                act=cfg.hidden_act)


def weights(model) -> dict:
    return {k: v.numpy().astype(np.float64) if v.is_floating_point() else v.numpy() for k, v in model.state_dict().items()}


def affine_code(seed: int = 3, **kw) -> CodeConfig:
    A, b = random_invertible_gf2(K, seed=seed)
    assert not np.array_equal(A, np.eye(K, dtype=np.uint8)) and b.any()
    return CodeConfig(bits=K, A=A, b=b, **kw)


IDS = np.array([[1, 65535, 57345, 104, 0, 4242, 31337, 7], [9, 8, 7, 6, 5, 4, 3, 2]], dtype=np.int64)


def check_against_oracle(cfg, seed=0, ids=IDS):
    model = random_model(cfg, seed)
    with torch.no_grad():
        got, _ = model(torch.from_numpy(ids))
    want = np_forward(weights(model), oracle_config(cfg), ids)
    err = np.abs(got.numpy() - want).max()
    assert err <= TOL, f"max abs diff {err:.2e} > {TOL} for {oracle_config(cfg)}"
    assert np.abs(want).max() > 0.5  # the comparison is not of near-zero numbers


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bit_order,values,tiling", list(itertools.product(
    ("lsb_first", "msb_first"), ("zero_one", "plus_minus_one"), ("repeat", "interleave"))))
def test_logits_match_numpy_oracle_all_conventions(bit_order, values, tiling):
    cfg = tiny_config(code=affine_code(bit_order=bit_order, values=values, tiling=tiling))
    check_against_oracle(cfg)


@pytest.mark.parametrize("variant", [
    dict(norm_type="rmsnorm", rope_pairing="interleaved", hidden_act="gelu_tanh",
         attention_bias=False, mlp_bias=False, norm_bias=False),
    dict(norm_type="rmsnorm", norm_bias=True, attention_bias=False, rope_theta=500.0),
    dict(rope_pairing="interleaved", mlp_bias=False, hidden_act="gelu_pytorch_tanh", code_scale=0.7),
], ids=["rms-interleaved-tanh-nobias", "rms-with-bias-theta500", "interleaved-tanh-scale"])
def test_logits_match_numpy_oracle_variants(variant):
    variant = dict(variant)
    scale = variant.pop("code_scale", 1.0)
    cfg = tiny_config(code=affine_code(seed=5, values="plus_minus_one", scale=scale), **variant)
    check_against_oracle(cfg, seed=1)


def test_lift_hand_computed():
    """SPEC 1.1 by hand: K = 4, t = 3, A upper bidiagonal blocks, b = [1, 0, 0, 1]."""
    code = dict(bits=4, A=np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]), b=np.array([1, 0, 0, 1]))
    t = torch.tensor([3])
    # lsb_first: c = [1,1,0,0], A c = [0,1,0,0], + b = [1,1,0,1]
    assert lift(t, CodeConfig(**code), 8).tolist() == [[1, 1, 0, 1, 1, 1, 0, 1]]
    assert lift(t, CodeConfig(**code, values="plus_minus_one", tiling="interleave"), 8).tolist() == [[1, 1, 1, 1, -1, -1, 1, 1]]
    # msb_first: c = [0,0,1,1], A c = [0,0,0,1], + b = [1,0,0,0]; scale 2
    assert lift(t, CodeConfig(**code, bit_order="msb_first", scale=2.0), 4).tolist() == [[2, 0, 0, 0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lift_injective_over_all_ids(seed):
    ids = torch.arange(V)
    A, b = random_invertible_gf2(K, seed=seed)
    for bit_order, values, tiling in itertools.product(("lsb_first", "msb_first"), ("zero_one", "plus_minus_one"),
                                                       ("repeat", "interleave")):
        code = CodeConfig(bits=K, A=A, b=b, bit_order=bit_order, values=values, tiling=tiling)
        x = lift(ids, code, 32).numpy()
        np.testing.assert_array_equal(x, np_lift(np.arange(V), A, b, bit_order, values, tiling, 1.0, 32))
        assert np.unique(x, axis=0).shape[0] == V, (bit_order, values, tiling)


def test_singular_A_is_refused():
    A, b = random_invertible_gf2(K, seed=0)
    A = A.copy()
    A[5] = A[2] ^ A[7]  # row 5 now depends on rows 2 and 7
    code = CodeConfig(bits=K, A=A, b=b)
    with pytest.raises(ConfigError, match=r"singular over GF\(2\) \(rank 15 < 16\)"):
        code.validate()
    with pytest.raises(ConfigError, match="singular"):
        TableFreeLM(tiny_config(code=code))
    # and it really is not injective: two ids share a code
    codes = np_lift(np.arange(V), A, b, "lsb_first", "zero_one", "repeat", 1.0, K)
    assert np.unique(codes, axis=0).shape[0] < V


def test_gf2_rank_hand_computed():
    # rows r1 + r2 = r3 mod 2, so rank 2 over GF(2), although the real determinant is 2 (rank 3 over R)
    M = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    assert round(np.linalg.det(M)) == 2
    assert gf2_rank(M) == 2
    assert gf2_rank(np.eye(16, dtype=np.uint8)) == 16
    assert gf2_rank(np.zeros((4, 4), dtype=np.uint8)) == 0
    assert gf2_rank(np.array([[1, 1], [1, 0]])) == 2
    assert gf2_rank(np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])) == 3


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(code=affine_code(seed=7, tiling="interleave")), seed=2)


def test_kv_cache_decoding_equals_full_forward(model):
    ids = torch.from_numpy(IDS)
    with torch.no_grad():
        full, _ = model(ids)
        past, worst = None, 0.0
        for t in range(ids.shape[1]):  # one token at a time
            step, past = model(ids[:, t:t + 1], past_key_values=past)
            worst = max(worst, (step[:, 0] - full[:, t]).abs().max().item())
        assert past[0][0].shape == (2, 4, ids.shape[1], 16)
        pre, past = model(ids[:, :3])  # prefill a chunk, then decode
        rest, _ = model(ids[:, 3:], past_key_values=past)
    assert worst <= TOL, worst
    assert (torch.cat([pre, rest], 1) - full).abs().max().item() <= TOL


def test_left_padded_row_equals_row_alone(model):
    a = IDS[0, 2:]  # 6 tokens, padded by 2 on the left
    pad = model.cfg.pad_token_id
    batch = torch.tensor([[pad, pad, *a], IDS[1].tolist()])
    mask = torch.tensor([[0, 0] + [1] * 6, [1] * 8])
    with torch.no_grad():
        got, past = model(batch, attention_mask=mask)
        alone, past_alone = model(torch.from_numpy(a[None]))
        # one decode step through the cache, still padded
        nxt = torch.tensor([[5], [6]])
        step, _ = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), past_key_values=past)
        step_alone, _ = model(nxt[:1], past_key_values=past_alone)
    assert (got[0, 2:] - alone[0]).abs().max().item() <= TOL
    assert (step[0] - step_alone[0]).abs().max().item() <= TOL
    want = np_forward(weights(model), oracle_config(model.cfg), batch.numpy(), mask.numpy())
    assert np.abs(got.numpy()[0, 2:] - want[0, 2:]).max() <= TOL
    assert np.abs(got.numpy()[1] - want[1]).max() <= TOL


# -- the generation oracle ------------------------------------------------------------------------
def test_greedy_generate_equals_argmax_loop_without_cache(model):
    prompt = [57345, 104, 101, 108]
    got = generate(model, prompt, 12)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # recompute the whole sequence each step: no cache involved
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert got == seq[len(prompt):]
    assert len(set(got)) > 1  # a model stuck on one token would prove little
    # eos stops generation and is included
    assert generate(model, prompt, 12, eos_token_id=got[3]) == got[:got.index(got[3]) + 1]


def test_generate_stops_at_context_and_rejects_bad_prompts(model):
    ctx = model.cfg.max_position_embeddings
    assert len(generate(model, [1] * (ctx - 3), 10)) == 3
    for bad, msg in (([], "empty prompt"), ([V], "outside"), ([1] * (ctx + 1), "longer than the context")):
        with pytest.raises(ValueError, match=msg):
            generate(model, bad, 4)


def test_sampling_seeded_and_filters(model):
    prompt = [57345, 104]
    a = generate(model, prompt, 10, do_sample=True, temperature=1.3, top_k=50, top_p=0.9, seed=11)
    assert a == generate(model, prompt, 10, do_sample=True, temperature=1.3, top_k=50, top_p=0.9, seed=11)
    assert a != generate(model, prompt, 10, do_sample=True, temperature=1.3, top_k=50, top_p=0.9, seed=12)
    assert generate(model, prompt, 10, do_sample=True, top_k=1, seed=3) == generate(model, prompt, 10)
    assert generate(model, prompt, 10, do_sample=True, temperature=0.0, seed=3) == generate(model, prompt, 10)

    logits = np.array([2.0, 1.0, 1.0, 0.5, -1.0, 3.0])
    p = np.exp(logits - logits.max())
    p /= p.sum()  # p = [.212, .078, .078, .047, .011, .575] (by hand: exp(x - 3) / 1.7389)
    assert np.isinf(filter_logits(logits, top_k=2)).tolist() == [False, True, True, True, True, False]
    assert np.isinf(filter_logits(logits, top_k=3)).tolist() == [False, False, False, True, True, False]  # tie kept
    # top_p 0.75: .575 < .75, .575 + .212 >= .75 -> keep {5, 0}
    assert np.isinf(filter_logits(logits, top_p=0.75)).tolist() == [False, True, True, True, True, False]
    np.testing.assert_allclose(filter_logits(logits, temperature=2.0), logits / 2)
    rng = np.random.default_rng(0)
    draws = np.bincount([sample_token(logits, rng) for _ in range(20000)], minlength=6) / 20000
    np.testing.assert_allclose(draws, p, atol=0.015)
