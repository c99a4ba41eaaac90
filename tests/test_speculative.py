"""Prompt-lookup speculative decoding (runtime/speculative.py) on the trained demo model.

Oracles: plain decoding of the same artifact (greedy token for token; seeded sampling draw for
draw, since the speculative loop takes the same random numbers); for the sampling law, the exact
distribution of the first three tokens computed here from model.onnx's logits (another graph)
with temperature and top-k applied by this file; for the acceptance rule, hand-computed
probabilities; for the verify Run, single-token steps of a second cache. Every speculative run
here rolls back into poisoned buffers (NaN past each row's length), so a stale entry that were
ever read would change the output.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

import runtime
from reference.data import DEMO_MODEL_DIR
from runtime.cache import SharedBufferCache
from runtime.errors import InputError
from runtime.sampling import SamplingConfig
from runtime.speculative import PROMPT_LOOKUP, PromptLookup, verify_token

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(),
                                reason=f"{DEMO_MODEL_DIR} has no model.safetensors")

PASSAGE = """GLOUCESTER:
Now is the winter of our discontent
Made glorious summer by this sun of York;
And all the clouds that lour'd upon our house
In the deep bosom of the ocean buried."""

# 5 prompts that repeat themselves (a passage, then its start again; a chant) and 5 that do not
PROMPTS = [
    PASSAGE + "\n\nGLOUCESTER:\nNow is the winter",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n\nJULIET:\nO Romeo, Romeo!",
    "All:\nSpeak, speak.\n\nFirst Citizen:\nSpeak, speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n",
    "the king, the king, the king, the king, the king, the",
    # the model's greedy continuation of this one falls into a loop (a line said over and over)
    ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
     "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n\nROMEO:\n"
     "But soft, what light"),
    "KING EDWARD:\nWhat news, my lord? Is Warwick come to town?\n",
    "DUCHESS OF YORK:\nAlas, my son, why weep you at my door?\n",
    "Servant:\nMadam, the horses wait below.\n\n",
    "MENENIUS:\nWhy, how now, masters!",
    "ROMEO:\n",
]


@pytest.fixture(scope="module")
def model() -> runtime.Model:
    from demo import demo_artifact

    return runtime.load(demo_artifact("arith"), provider="cpu", threads=1)


@pytest.fixture(autouse=True)
def poisoned_rollback(monkeypatch):
    """Every rollback fills the buffers past the new length with NaN, and counts itself."""
    counts = Counter()
    real_truncate, real_verify = SharedBufferCache.truncate, SharedBufferCache.verify

    def truncate(self, length):
        counts["rolled_back"] += int(self.seqlens[0]) > length
        real_truncate(self, length)
        for a in self._host:
            a[:, :, length:] = np.nan

    def verify(self, tokens):
        counts["verifies"] += 1
        return real_verify(self, tokens)

    monkeypatch.setattr(SharedBufferCache, "truncate", truncate)
    monkeypatch.setattr(SharedBufferCache, "verify", verify)
    return counts


def test_greedy_is_plain_decoding_token_for_token(model, poisoned_rollback):
    for prompt in PROMPTS:
        full = model.generate(prompt, max_new_tokens=80)
        for n in (1, 2, 7, 80):
            spec = model.generate(prompt, max_new_tokens=n, speculative=PROMPT_LOOKUP)
            assert spec.ids == full.ids[:n], (prompt, n)
            assert spec.text == model.generate(prompt, max_new_tokens=n).text
            assert spec.finish_reason == "length"
    # the drafts were checked and some of them were wrong: both branches ran, into poisoned buffers
    assert poisoned_rollback["verifies"] > 50 and poisoned_rollback["rolled_back"] > 10


def test_stop_string_eos_and_min_new_tokens_as_plain(model):
    prompt = PROMPTS[3]
    full = model.generate(prompt, max_new_tokens=60)
    # an end token that the text repeats, so it arrives inside an accepted draft
    end = Counter(full.ids[10:]).most_common(1)[0][0]
    cases = [dict(stop="\n"), dict(stop=[model.decode(full.ids[20:23])]), dict(stop=end),
             dict(stop=end, min_new_tokens=25), dict(stop=[end, "king"], min_new_tokens=3)]
    for kw in cases:
        plain = model.generate(prompt, max_new_tokens=60, **kw)
        spec = model.generate(prompt, max_new_tokens=60, speculative=PROMPT_LOOKUP, **kw)
        assert (spec.ids, spec.text, spec.finish_reason) == (plain.ids, plain.text, plain.finish_reason), kw
        assert "".join(model.stream(prompt, max_new_tokens=60, speculative=PROMPT_LOOKUP, **kw)) == plain.text
    assert model.generate(prompt, max_new_tokens=60, stop=end).finish_reason == "eos"


def test_seeded_sampling_takes_the_same_draws(model, poisoned_rollback):
    settings = [dict(temperature=0.7), dict(temperature=1.0, top_k=20), dict(temperature=0.9, top_p=0.8),
                dict(temperature=0.8, top_k=50, repetition_penalty=1.3)]
    for kw in settings:
        for seed in range(4):
            for prompt in (PROMPTS[0], PROMPTS[3], PROMPTS[5]):
                plain = model.generate(prompt, max_new_tokens=40, do_sample=True, seed=seed, **kw)
                spec = model.generate(prompt, max_new_tokens=40, do_sample=True, seed=seed,
                                      speculative=PROMPT_LOOKUP, **kw)
                assert spec.ids == plain.ids, (kw, seed, prompt)
    assert poisoned_rollback["rolled_back"] > 0


def _process(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """softmax(logits / T) over the top_k tokens, written here (not runtime/sampling.py)."""
    z = logits.astype(np.float64) / temperature
    keep = np.argsort(z)[-top_k:]
    p = np.zeros_like(z)
    p[keep] = np.exp(z[keep] - z[keep].max())
    return p / p.sum()


@pytest.mark.slow
def test_sampled_distribution_is_unchanged(model, poisoned_rollback):
    """The first 3 tokens of many seeded speculative runs against their exact law from model.onnx."""
    prompt = model.encode("the king, the king, the king, the king, the")
    T, K, N = 1.5, 3, 1200

    def law(ctx):
        return _process(model.forward(np.asarray([ctx]), logits_to_keep=1).logits[0, -1], T, K)

    exact: dict[tuple[int, ...], float] = {}
    p1 = law(prompt)
    for a in np.flatnonzero(p1):
        p2 = law(prompt + [int(a)])
        for b in np.flatnonzero(p2):
            p3 = law(prompt + [int(a), int(b)])
            for c in np.flatnonzero(p3):
                exact[(int(a), int(b), int(c))] = p1[a] * p2[b] * p3[c]
    before = Counter(poisoned_rollback)
    seen = Counter(tuple(model.generate(prompt, max_new_tokens=3, do_sample=True, temperature=T, top_k=K, seed=s,
                                        speculative=PROMPT_LOOKUP).ids) for s in range(N))
    # token 1 is " ki" in about a third of the runs: then " ki" -> "ng," is drafted and checked
    assert poisoned_rollback["verifies"] - before["verifies"] > N // 5
    assert poisoned_rollback["rolled_back"] - before["rolled_back"] > N // 20
    assert set(seen) <= set(exact)
    # Pearson's chi-square over cells with expected count >= 5 (the rest pooled), against the
    # chi-square quantile at p = 1e-6 (Wilson-Hilferty), so a correct sampler fails 1 run in 10^6
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [c for c in cells if N * exact[c] >= 5]
    rest_p = 1 - sum(exact[c] for c in big)
    obs = [seen[c] for c in big] + [N - sum(seen[c] for c in big)]
    exp = [N * exact[c] for c in big] + [N * rest_p]
    pairs = [(o, e) for o, e in zip(obs, exp) if e > 0]
    chi2 = sum((o - e) ** 2 / e for o, e in pairs)
    df = len(pairs) - 1
    z = 4.753  # the standard normal's 1 - 1e-6 quantile
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert df >= 8, "too few cells to say anything"
    assert chi2 < crit, f"chi-square {chi2:.1f} >= {crit:.1f} (df {df}): speculation changed the distribution"
    # and the total variation distance, bounded from the sample size alone (E[TV] <= sqrt(cells / N) / 2,
    # McDiarmid for the deviation, delta = 1e-6)
    tv = 0.5 * sum(abs(seen[c] / N - exact[c]) for c in cells)
    assert tv < 0.5 * math.sqrt(len(cells) / N) + math.sqrt(math.log(1e6) / (2 * N))


class _FixedUniform:
    """A generator stub whose draws are given: rng.random(n) returns [u] * n."""

    def __init__(self, u: float):
        self.u = u

    def random(self, n: int) -> np.ndarray:
        return np.full(n, self.u)


@pytest.mark.parametrize("p, cfg, draft, accept, residual", [
    # p = (0.5, 0.3, 0.2), draft 1: accept with p(1) = 0.3; else (p - onehot)+ renormalised = (5/7, 0, 2/7)
    ((0.5, 0.3, 0.2), dict(), 1, 0.3, (5 / 7, 0, 2 / 7)),
    # top_k = 2 first: p = (0.625, 0.375, 0); a draft outside it is never accepted, the residual is p
    ((0.5, 0.3, 0.2), dict(top_k=2), 2, 0.0, (0.625, 0.375, 0)),
    ((0.5, 0.3, 0.2), dict(top_k=2), 0, 0.625, (0, 1, 0)),
    # temperature 2: p ~ sqrt(p) = (0.7071, 0.5477, 0.4472) / 1.7020
    ((0.5, 0.3, 0.2), dict(temperature=2.0), 0, 0.41545, (0, 0.54772 / 0.99493, 0.44721 / 0.99493)),
])
def test_acceptance_rule_against_hand_computed_law(p, cfg, draft, accept, residual):
    """verify_token's law, integrated exactly over its one uniform draw (a grid of 20,000 midpoints)."""
    sampling = SamplingConfig(do_sample=True, **cfg)
    logits = np.log(np.asarray([p], np.float64))
    G = 20000
    outcomes = [verify_token(logits, None, sampling, _FixedUniform((j + 0.5) / G), (), draft) for j in range(G)]
    assert all(acc == (tok == draft) for tok, acc in outcomes)
    got_accept = sum(acc for _, acc in outcomes) / G
    assert got_accept == pytest.approx(accept, abs=2e-4)
    rejected = Counter(tok for tok, acc in outcomes if not acc)
    got_residual = [rejected[t] / max(1, sum(rejected.values())) for t in range(3)]
    assert got_residual == pytest.approx(residual, abs=2e-4)


def test_greedy_acceptance_is_the_argmax():
    logits = np.log(np.asarray([[0.2, 0.5, 0.3]]))
    assert verify_token(logits, None, SamplingConfig(), None, (), 1) == (1, True)
    assert verify_token(logits, None, SamplingConfig(), None, (), 2) == (1, False)
    assert verify_token(logits, None, SamplingConfig(), None, (1,), 2) == (2, True)  # min_new_tokens' ban


class CountingSession:
    """An ONNX Runtime session that counts its Runs."""

    def __init__(self, real):
        self.real, self.runs = real, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def run_with_iobinding(self, binding, *a):
        self.runs += 1
        return self.real.run_with_iobinding(binding, *a)


def test_one_verify_run_gives_every_position(model):
    """k drafted tokens (plus the one before them) are checked in ONE Run, whose logits equal k + 1 steps."""
    ids = model.encode(PROMPTS[0])
    P, k = 30, 4
    fed = np.asarray(ids[P:P + k + 1], np.int64)
    steps = model._kv.new_cache(1, 64)
    steps.prefill(np.asarray([ids[:P]]))
    want = np.stack([steps.step(fed[i:i + 1]).copy()[0] for i in range(k + 1)])  # [k + 1, V]
    cache = model._kv.new_cache(1, 64)
    cache.prefill(np.asarray([ids[:P]]))
    cache.sess = counting = CountingSession(cache.sess)
    got = cache.verify(fed)
    assert counting.runs == 1 and got.shape == (k + 1, model.vocab_size)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert int(cache.seqlens[0]) == P + k + 1
    cache.truncate(P + 2)  # keep 2 of the 5; the next token lands at position P + 2
    for a in cache._host:  # what was rolled back must never be read again
        a[:, :, P + 2:] = np.nan
    after = cache.step(fed[3:4])[0]  # a token other than the rolled-back fed[2], at position P + 2
    ctx = ids[:P] + [int(fed[0]), int(fed[1]), int(fed[3])]
    np.testing.assert_allclose(after, model.forward(np.asarray([ctx]), logits_to_keep=1).logits[0, -1], atol=1e-4)


def test_speculation_saves_runs_on_repeating_text(model):
    """Fewer Runs than tokens where the continuation repeats (the model loops on this chant)."""
    real = model._kv.session
    model._kv.session = counting = CountingSession(real)
    try:
        r = model.generate(PROMPTS[4], max_new_tokens=120, speculative=PROMPT_LOOKUP)
        spec_runs, counting.runs = counting.runs, 0
        model.generate(PROMPTS[4], max_new_tokens=120)
    finally:
        model._kv.session = real
    assert counting.runs == len(r.ids) == 120  # plain: the prefill and 119 steps
    assert spec_runs < 0.7 * 120  # 72 at this writing: 48 tokens came from accepted drafts


def test_prompt_lookup_drafts_from_the_latest_match():
    d = PromptLookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert d.draft(3) == [7, 8, 5]  # [2, 3] last seen before 7 (the 3-gram [5, 2, 3] never was)
    d.append(4)
    assert d.draft(2) == []  # 4 never seen before
    d = PromptLookup([6, 6, 6])
    assert d.draft(4) == [6]  # the continuation may run up to the end of the text
    assert PromptLookup([5]).draft(4) == []


def test_batches_and_model_onnx_decode_plainly(model):
    batch = PROMPTS[:3]
    assert ([r.ids for r in model.generate(batch, max_new_tokens=12, speculative=PROMPT_LOOKUP)]
            == [r.ids for r in model.generate(batch, max_new_tokens=12)])
    spec_only = runtime.load(model.info.folder, provider="cpu", graph="spec")
    assert (spec_only.generate(PROMPTS[3], max_new_tokens=20, speculative=PROMPT_LOOKUP).ids
            == spec_only.generate(PROMPTS[3], max_new_tokens=20).ids)


@pytest.mark.parametrize("bad", ["prompt-lookup", "on", True, 1])
def test_bad_mode_is_one_line_before_any_run(model, bad):
    with pytest.raises(InputError, match="speculative = .* must be one of"):
        model.generate("ROMEO:", speculative=bad)
    with pytest.raises(InputError, match="speculative"):
        model.stream("ROMEO:", speculative=bad)


def test_cli_flag(model, capsys):
    from runtime.cli import main

    argv = ["generate", "--model", str(model.info.folder), "--provider", "cpu", "--prompt", PROMPTS[3],
            "--max-new-tokens", "30"]
    assert main(argv + ["--speculative", "prompt_lookup"]) == 0
    spec = capsys.readouterr().out
    assert main(argv) == 0
    assert spec == capsys.readouterr().out and len(spec) > 10
