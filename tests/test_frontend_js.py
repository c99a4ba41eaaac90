"""The artifact in JavaScript, checked against the Python runtime (issue 12, items 3 and 4).

- the page's tokenizer (runtime/web/tablefree.mjs) and transformers.js's encode and decode exactly
  as the Python `tokenizers` library does;
- onnxruntime-node runs both graphs of the demo artifact (model.onnx, SPEC 3; model.kv.onnx,
  the shared-buffer graph) in every lift mode, through the page's generation loop, and produces
  the runtime's greedy tokens;
- transformers.js (Node) loads the folder and generates the runtime's greedy tokens from text;
- the page's sampler draws from softmax(logits / T) restricted to the top k.

Needs `make setup-js` (node and tests/js/node_modules); skips without it, fails where CI is set.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jsfront import NEW_TOKENS, PROMPTS, demo_artifact, need, node, prompt_ids, runtime_ids

MODES = ["arith", pytest.param("bitwise", marks=pytest.mark.slow), pytest.param("lookup", marks=pytest.mark.slow)]

FIXED_TEXTS = [
    "ROMEO:",
    "hello the test",  # SPEC 4's vector (its ids differ here: the demo tokenizer has its own n-grams)
    "  two  spaces\n\nand newlines\r\n\ttab ",
    "What, ho! apothecary! -- 'Tis torture, and not mercy: (heaven's) [here]; \"fair\" Verona?",
    "Привет, мир! 你好世界 שלום مرحبا नमस्ते Ελληνικά",
    "emoji 😀👍🏽 beyond the BMP, and ＦＵＬＬ width",
    "<s>special</s><pad> tokens [INST] inside",
    "\ue000\uf8ff private use",
    "",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings over the characters the demo tokenizer merges most (many merges apply), plus rarer ones."""
    rng = random.Random(seed)
    common = "etaoinshrdlucmfwypvbgkETAOINSHRDLU ,.;:!?'\n\n    "
    rare = "éü—ÆЖ中🙂<>/s"
    return ["".join(rng.choice(common) if rng.random() < 0.95 else rng.choice(rare) for _ in range(rng.randint(1, 400)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def node_env():
    return need(node_packages=("onnxruntime-node", "@huggingface/transformers"))


def test_tokenizers_encode_and_decode_like_python(node_env):
    import tokenizers

    folder = demo_artifact("arith")
    texts = FIXED_TEXTS + _random_texts(200)
    py = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    want = [py.encode(t).ids for t in texts]
    got = node("tokenize.mjs", str(folder), stdin=json.dumps(texts), env=node_env)
    for name in ("bpe", "transformers"):
        bad = [(t, w, g) for t, w, g in zip(texts, want, got[name]) if w != g]
        assert not bad, f"{name}: {len(bad)} of {len(texts)} texts encode differently, first {bad[0]}"
        decoded = [py.decode(w, skip_special_tokens=False) for w in want]
        bad = [(d, g) for d, g in zip(decoded, got[f"{name}_decoded"]) if d != g]
        assert not bad, f"{name}: {len(bad)} texts decode differently, first {bad[0]}"
    assert sum(len(w) for w in want) < sum(len(t) for t in texts), "no merge applied: the test set is too easy"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("graph", ["model.onnx", "model.kv.onnx"])
def test_onnxruntime_node_generates_the_runtime_tokens(node_env, mode, graph):
    folder = demo_artifact(mode)
    out = node("ort_node.mjs", str(folder), graph, str(NEW_TOKENS), *PROMPTS, env=node_env)
    assert ("seqlens_k" in out["inputs"]) == (graph == "model.kv.onnx")
    assert [r["prompt_ids"] for r in out["results"]] == prompt_ids(mode)
    want = runtime_ids(mode)
    assert [len(w) for w in want] == [NEW_TOKENS] * len(PROMPTS)  # no early end token: all 40 compared
    for prompt, w, r in zip(PROMPTS, want, out["results"]):
        assert r["ids"] == w, f"{mode} {graph} {prompt!r}: onnxruntime-node's greedy tokens differ from the runtime's"


@pytest.mark.parametrize("mode", MODES)
def test_transformers_js_generates_the_runtime_tokens_from_text(node_env, mode):
    import runtime

    folder = demo_artifact(mode)
    out = node("transformers_js.mjs", str(folder), str(NEW_TOKENS), *PROMPTS, env=node_env)
    m = runtime.load(demo_artifact(mode), provider="cpu")
    for prompt, w, r in zip(PROMPTS, runtime_ids(mode), out):
        assert r["prompt_ids"] == m.encode(prompt)
        assert r["ids"] == w, f"{mode} {prompt!r}: transformers.js's greedy tokens differ from the runtime's"
        assert r["text"] == m.decode(w)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 3), (2.0, 1)])
def test_page_sampler_follows_softmax_with_top_k(node_env, temperature, top_k):
    logits = [2.0, 1.0, 0.5, 0.5, -1.0, 3.0, 0.0]
    n = 40000
    counts = np.array(node("sampling.mjs", stdin=json.dumps(
        {"logits": logits, "temperature": temperature, "top_k": top_k, "n": n, "seed": 7}), env=node_env))
    x = np.array(logits) / temperature
    if top_k:
        x[x < np.sort(x)[-top_k]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    assert counts.sum() == n
    assert np.all(counts[p == 0] == 0), "a token outside the top k was drawn"
    # 40,000 draws: a frequency's standard deviation is at most 0.0025; 0.012 is about 5 sigma
    assert np.abs(counts / n - p).max() < 0.012, (counts / n, p)
