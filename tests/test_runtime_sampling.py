"""Sampling filters against a plain-Python oracle written here, seeded sampling against the torch
oracle (reference.generate), and stopping: end ids, min_new_tokens, stop strings across tokens."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import runtime
from runtime.sampling import SamplingConfig, process_logits, sample

NEG = -math.inf


# ---- the oracle: HF's definitions, element by element, no numpy tricks ---------------------------
def oracle(logits, history=(), penalty=1.0, temperature=1.0, top_k=0, top_p=1.0, banned=()):
    s = [float(x) for x in logits]
    for t in set(history):  # repetition penalty (CTRL): divide positive, multiply negative
        s[t] = s[t] * penalty if s[t] < 0 else s[t] / penalty
    for t in banned:
        s[t] = NEG
    s = [x / temperature for x in s]
    if 0 < top_k < len(s):  # keep everything >= the k-th largest value (ties at the border stay)
        kth = sorted(s, reverse=True)[top_k - 1]
        s = [x if x >= kth else NEG for x in s]
    if top_p < 1.0:  # keep the most likely tokens until their mass reaches top_p (at least one)
        m = max(s)
        z = sum(math.exp(x - m) for x in s if x != NEG)
        # among equal scores the later id counts as more likely: HF sorts ascending with a stable
        # sort and removes from the front, so at a tie on the border the earlier id goes first
        order = sorted(range(len(s)), key=lambda i: (-s[i], -i))
        keep, mass = set(), 0.0
        for i in order:
            if mass < top_p:
                keep.add(i)
            mass += math.exp(s[i] - m) / z if s[i] != NEG else 0.0
        s = [x if i in keep else NEG for i, x in enumerate(s)]
    return np.array(s)


def run(logits, history=(), **kw):
    banned = kw.pop("banned", ())
    cfg = SamplingConfig(do_sample=True, **kw)
    return process_logits(np.asarray([logits], np.float32), [list(history)], cfg, banned)[0]


CRAFTED = [
    [3.0, 1.0, 3.0, 2.0, 3.0, -1.0, 0.5],  # three-way tie at the top
    [2.0, 2.0, 1.0, 1.0, 0.0, -2.0, -2.0],  # ties at the top-k border
    [0.1, 4.0, -3.0, 2.5, 2.5, 0.0, 1.2],
    [-1.0, -0.5, -4.0, -0.2, -3.0, -0.5, -2.2],  # all negative: penalty multiplies
]


@pytest.mark.parametrize("logits", CRAFTED)
@pytest.mark.parametrize("kw", [
    dict(top_k=1), dict(top_k=2), dict(top_k=3), dict(top_k=0), dict(top_p=1.0), dict(top_p=0.5),
    dict(top_p=0.8), dict(top_p=0.05), dict(temperature=0.5, top_p=0.7), dict(temperature=2.0, top_k=4, top_p=0.6),
    dict(penalty=1.5, history=(0, 3, 3, 5)), dict(penalty=0.7, history=(1, 2), top_k=2),
    dict(penalty=1.3, history=(4,), temperature=0.7, top_k=5, top_p=0.9, banned=(1,)),
])
def test_filters_match_oracle(logits, kw):
    kw = dict(kw)
    history = kw.pop("history", ())
    penalty = kw.pop("penalty", 1.0)
    want = oracle(logits, history, penalty, **kw)
    got = run(logits, history, repetition_penalty=penalty, **kw)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_filter_edge_cases():
    x = CRAFTED[0]
    assert not np.isinf(run(x, top_p=1.0)).any()  # top_p = 1 removes nothing
    assert set(np.flatnonzero(~np.isinf(run(x, top_k=1)))) == {0, 2, 4}  # top_k=1 keeps all tied maxima
    assert np.flatnonzero(~np.isinf(run(CRAFTED[2], top_k=1))).tolist() == [1]
    assert np.flatnonzero(~np.isinf(run(CRAFTED[2], top_p=1e-9))).tolist() == [1]  # at least one token stays
    # the order matters: temperature before top_p (HF) keeps a different set than after it
    y = [2.0, 1.0, 0.0, -1.0]
    hot = run(y, temperature=4.0, top_p=0.6)
    assert np.isinf(hot).sum() == oracle(y, temperature=4.0, top_p=0.6).tolist().count(NEG) == 2
    assert np.isinf(run(y, top_p=0.6)).sum() == 3  # at temperature 1 only the top token holds 0.6


@pytest.mark.parametrize("scale,p", [(12.0, 0.9), (6.0, 0.95), (3.0, 0.95), (0.3, 0.5), (8.0, 0.999)])
def test_top_p_on_a_full_vocabulary_row_matches_oracle(scale, p):
    """Rows of the seed's 65,536 tokens take the candidates-only path (sampling.TOP_P_CANDIDATES)
    when the most likely tokens hold p of the mass, the full sort otherwise (the flat row); both
    must keep exactly the oracle's tokens, also with ties across the cut and -inf entries."""
    from runtime.sampling import _top_p_row

    rng = np.random.default_rng(int(scale * 10))
    row = (rng.standard_normal(65536) * scale).astype(np.float32)
    row[rng.integers(0, 65536, 5000)] = NEG
    tied = row.copy()
    order = np.argsort(-tied)
    tied[order[1020:1030]] = tied[order[1024]]  # a tie across the first cut
    for x in (row, tied):
        want = oracle(x, top_p=p)
        got = run(x, top_p=p)
        np.testing.assert_array_equal(np.flatnonzero(~np.isinf(got)), np.flatnonzero(~np.isinf(want)))
    decided = _top_p_row(row.astype(np.float64), p, 8192) is not None
    assert decided == (scale >= 3.0)  # the peaked rows are decided among the candidates, the flat one is not


def test_temperature_to_zero_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1000)).astype(np.float32)
    for t in (1e-3, 1e-5):
        scores = process_logits(logits, None, SamplingConfig(do_sample=True, temperature=t))
        draws = np.stack([sample(scores, rng) for _ in range(50)])
        assert (draws == logits.argmax(-1)).all()
    assert SamplingConfig(do_sample=True, temperature=0.0).greedy


def test_sample_follows_the_distribution_and_never_draws_filtered():
    rng = np.random.default_rng(1)
    logits = np.array([[1.0, 0.0, 2.0, -1.0, 0.5, 3.0]])
    scores = process_logits(logits, None, SamplingConfig(do_sample=True, top_k=4))
    n = 40000
    counts = np.bincount(np.concatenate([sample(scores, rng) for _ in range(n)]), minlength=6)
    assert counts[1] == counts[3] == 0  # removed by top_k
    keep = [0, 2, 4, 5]
    p = np.exp(logits[0, keep]) / np.exp(logits[0, keep]).sum()
    assert np.abs(counts[keep] / n - p).max() < 0.01  # 4 sigma is about 0.01 at n = 40,000


# ---- with a model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_artifacts):
    return runtime.load(tiny_artifacts("bitwise"), provider="cpu")


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    from reference.checkpoint import load_model

    return load_model(tiny_ckpt)


PROMPT = "O, what a rogue and peasant slave am I!"


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(top_p=0.8),
                                dict(temperature=1.3, top_k=100, top_p=0.95)])
def test_seeded_sampling_reproducible_and_equal_to_torch_oracle(model, ref, kw):
    from reference.generate import generate

    ids = model.encode(PROMPT)
    a = model.generate(ids, max_new_tokens=32, do_sample=True, seed=123, **kw)
    b = model.generate(ids, max_new_tokens=32, do_sample=True, seed=123, **kw)
    c = model.generate(ids, max_new_tokens=32, do_sample=True, seed=124, **kw)
    assert a.ids == b.ids and a.ids != c.ids
    assert a.ids == generate(ref, ids, 32, do_sample=True, seed=123, eos_token_id=model.eos_token_ids, **kw)


def test_greedy_with_repetition_penalty_matches_oracle_loop(model, ref):
    ids = model.encode(PROMPT)
    seq = list(ids)
    for _ in range(24):
        with torch.no_grad():
            logits = ref(torch.tensor([seq]))[0][0, -1].double().numpy()
        seq.append(int(np.argmax(oracle(logits, seq, 1.8))))
    got = model.generate(ids, max_new_tokens=24, repetition_penalty=1.8)
    assert got.ids == seq[len(ids):]
    assert got.ids != model.generate(ids, max_new_tokens=24).ids  # the penalty changed something


def test_end_ids_and_min_new_tokens(model):
    plain = model.generate(PROMPT, max_new_tokens=10).ids
    first = plain[0]
    r = model.generate(PROMPT, max_new_tokens=10, stop=[first])
    assert r.ids == [first] and r.finish_reason == "eos" and r.text == ""
    r = model.generate(PROMPT, max_new_tokens=10, stop=[first], min_new_tokens=4)
    assert first not in r.ids[:4] and len(r.ids) >= 4
    later = plain[5]
    r = model.generate(PROMPT, max_new_tokens=10, stop=later)
    cut = plain.index(later)
    assert r.ids == plain[: cut + 1] and r.text == model.decode(plain[:cut])


def _spanning_stop(model, ids):
    """A 2-character stop string whose first occurrence straddles the boundary of tokens k-1, k."""
    text = model.decode(ids)
    for k in range(2, len(ids)):
        left, right = model.decode(ids[:k - 1]), model.decode(ids[k - 1:k])
        nxt = model.decode(ids[k:k + 1])
        stop = right[-1] + nxt[0]
        pos = len(left) + len(right) - 1
        if text.find(stop) == pos:
            return k, stop, pos
    pytest.skip("no token boundary with a unique 2-character stop string in this output")


def test_stop_string_spanning_two_tokens(model):
    full = model.generate(PROMPT, max_new_tokens=40)
    k, stop, pos = _spanning_stop(model, full.ids)
    r = model.generate(PROMPT, max_new_tokens=40, stop=[stop, "never-appears"])
    assert r.finish_reason == "stop"
    assert r.text == full.text[:pos] and stop not in r.text
    assert r.ids == full.ids[: k + 1]  # stopped on the token that completed the stop string
    pieces = list(model.stream(PROMPT, max_new_tokens=40, stop=[stop, "never-appears"]))
    assert "".join(pieces) == r.text
    # sampled and batched too: each row stops on its own
    rows = model.generate([PROMPT, "A"], max_new_tokens=40, stop=stop)
    assert rows[0].text == r.text and rows[0].finish_reason == "stop"


def test_stream_holds_back_a_possible_stop_prefix(model):
    """A stop string that never completes: its partial matches are released in the end, nothing lost."""
    full = model.generate(PROMPT, max_new_tokens=30)
    stop = full.text[3:6] + "\x00"  # starts like the text, never matches
    pieces = list(model.stream(PROMPT, max_new_tokens=30, stop=stop))
    assert "".join(pieces) == full.text
