"""Prompt log-probabilities on `/v1/completions` (echo with logprobs, issue #19.1), what
lm-evaluation-harness's `local-completions` needs for loglikelihood tasks, through the official
`openai` client against a live server on the demo artifact.

Oracles: the runtime's own `Model.score` (a whole-window prefill, another code path than the
server's row-by-row pieces), the PyTorch reference's forward (log_softmax of its logits at each
position for the next token, within docs/parity.md's fp32 bound), offsets from decoding the
prompt's prefixes, and the same request without echo for the generated part. Two servers: the
defaults (a prompt in one Run), and a tight one (8 prompt tokens between decode steps, 5 logit
positions per Run) so every prompt goes in pieces across scheduler loops.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")

import runtime  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.background import BackgroundServer  # noqa: E402
from runtime.serve.logprobs import prompt_logprobs, token_logprobs  # noqa: E402

NAME = "demo"
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?")
SHORT = "ROMEO:\nWherefore art thou"
# docs/parity.md: fp32 logits within 1e-4 x max|logit| of the reference; a log_softmax moves by at
# most twice the largest logit difference
PARITY = 2e-4


@pytest.fixture(scope="module")
def model():
    from demo import demo_artifact

    return runtime.load(demo_artifact("arith"), provider="cpu", graph="kv", threads=1)


def _serve(model, **kw):
    app = create_app(model, name=NAME, max_batch=4, **kw)
    return app, BackgroundServer(app)


@pytest.fixture(scope="module", params=["default", "tight"])
def client(request, model):
    if request.param == "default":
        app, bg = _serve(model)
    else:
        app, bg = _serve(model, max_prefill_tokens=8)
        app.state.served.scheduler.logits_rows = 5
    with bg as s:
        yield openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference_logprobs(model):
    """ids -> the reference's log-probability of token i + 1 at position i, and its max|logit|."""
    import torch

    from reference.checkpoint import load_model
    from reference.data import DEMO_MODEL_DIR

    ref = load_model(DEMO_MODEL_DIR).eval()

    def get(ids: list[int]) -> tuple[np.ndarray, float]:
        with torch.no_grad():
            logits = ref(torch.tensor([ids]))[0][0].double()  # [S, V]
        logp = torch.log_softmax(logits, -1)
        return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy(), float(logits.abs().max())

    return get


def _score(client, prompt, **kw):
    kw = {"max_tokens": 0, "logprobs": 1, **kw}
    return client.completions.create(model=NAME, prompt=prompt, echo=True, **kw)


def same(a, b, atol: float = 1e-5) -> None:
    """Two choices' logprobs agree: the same tokens, offsets and top tokens, values within atol
    (piece boundaries that differ, from what else was admitted, round the last bits differently)."""
    assert a.tokens == b.tokens and a.text_offset == b.text_offset
    assert [x is None for x in a.token_logprobs] == [x is None for x in b.token_logprobs]
    np.testing.assert_allclose([x for x in a.token_logprobs if x is not None],
                               [x for x in b.token_logprobs if x is not None], atol=atol, rtol=0)
    for x, y in zip(a.top_logprobs, b.top_logprobs):
        assert (x is None) == (y is None)
        if x is not None:
            assert list(x) == list(y)
            np.testing.assert_allclose(list(x.values()), list(y.values()), atol=atol, rtol=0)


def test_prompt_logprobs_equal_score_and_reference(client, model, reference_logprobs):
    ids = model.encode(TEXT)
    assert len(ids) > 40  # several pieces on the tight server
    r = _score(client, TEXT)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text == TEXT and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == len(ids) == len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.tokens == [model.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # OpenAI's legacy shape
    got = np.asarray(lp.token_logprobs[1:])
    np.testing.assert_allclose(got, model.score(ids).token_logprobs, atol=1e-5, rtol=0)
    want, scale = reference_logprobs(ids)
    assert np.abs(got - want).max() <= PARITY * scale
    # logprobs=1: the most likely token at each position, whose value ties the chosen one where it
    # is the chosen one (lm-eval's is_greedy compares exactly this)
    for i, top in enumerate(lp.top_logprobs[1:], 1):
        (tok, best), = top.items()
        assert best >= lp.token_logprobs[i]
        if tok == lp.tokens[i]:
            assert best == lp.token_logprobs[i]


def test_text_offsets_point_into_the_text(client, model):
    ids = model.encode(TEXT)
    lp = _score(client, TEXT, logprobs=0).choices[0].logprobs
    assert lp.text_offset == [len(model.decode(ids[:i])) for i in range(len(ids))]
    assert all(TEXT[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    assert lp.top_logprobs[1:] == [{}] * (len(ids) - 1)  # logprobs=0: the chosen token's only


def test_token_id_prompts_score_the_same(client, model):
    ids, short = model.encode(TEXT), model.encode(SHORT)
    by_text = _score(client, TEXT, logprobs=3).choices[0]
    by_ids = _score(client, ids, logprobs=3).choices[0]
    assert by_ids.text == by_text.text and by_ids.logprobs == by_text.logprobs  # the same request
    both = _score(client, [short, ids], logprobs=3).choices
    assert [c.index for c in both] == [0, 1]
    same(both[1].logprobs, by_text.logprobs)
    same(both[0].logprobs, _score(client, SHORT, logprobs=3).choices[0].logprobs)
    assert len(both[0].logprobs.tokens) == len(short)


def test_generated_part_equals_the_request_without_echo(client, model):
    for prompt, n in ((SHORT, 12), (TEXT, 1)):  # max_tokens=1: what lm-eval's loglikelihood sends
        plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, logprobs=3).choices[0]
        echo = _score(client, prompt, max_tokens=n, temperature=0, logprobs=3).choices[0]
        k = len(model.encode(prompt))
        assert echo.text == prompt + plain.text and echo.finish_reason == plain.finish_reason
        g, p = echo.logprobs, plain.logprobs
        assert g.tokens[k:] == p.tokens and g.text_offset[k:] == [o + len(prompt) for o in p.text_offset]
        tail = type(g)(tokens=p.tokens, text_offset=p.text_offset, token_logprobs=g.token_logprobs[k:],
                       top_logprobs=g.top_logprobs[k:])
        same(tail, p)
        assert g.token_logprobs[:k] == _score(client, prompt, logprobs=3).choices[0].logprobs.token_logprobs


def test_stream_carries_the_same_logprobs(client):
    whole = _score(client, SHORT, max_tokens=6, temperature=0, logprobs=2).choices[0]
    chunks = list(_score(client, SHORT, max_tokens=6, temperature=0, logprobs=2, stream=True))
    assert chunks[0].choices[0].text == SHORT  # the echo comes first, with the prompt's logprobs
    assert "".join(ch.choices[0].text for ch in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        got = [x for ch in chunks if ch.choices[0].logprobs for x in getattr(ch.choices[0].logprobs, field)]
        assert got == getattr(whole.logprobs, field), field


def test_scoring_runs_alongside_generation(client, model):
    """Scoring requests and generations at once: each equals its answer alone."""
    gen = dict(model=NAME, prompt=SHORT, max_tokens=40, temperature=0)
    alone_gen = client.completions.create(**gen).choices[0].text
    alone_score = _score(client, TEXT).choices[0].logprobs
    with ThreadPoolExecutor(6) as pool:
        gens = [pool.submit(client.completions.create, **gen) for _ in range(3)]
        scores = [pool.submit(_score, client, TEXT) for _ in range(3)]
        assert all(f.result().choices[0].text == alone_gen for f in gens)
        for f in scores:
            same(f.result().choices[0].logprobs, alone_score)


def test_echo_alone_with_max_tokens_0_returns_the_prompt(client):
    r = client.completions.create(model=NAME, prompt=SHORT, echo=True, max_tokens=0)
    assert r.choices[0].text == SHORT and r.choices[0].logprobs is None and r.usage.completion_tokens == 0


def test_prompt_over_the_context_is_one_clear_400(client, model):
    ids = model.encode(TEXT)
    long = (ids * (model.context_length // len(ids) + 1))[: model.context_length + 1]
    with pytest.raises(openai.BadRequestError) as e:
        _score(client, long)
    err = e.value.body
    err = err.get("error", err)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert f"{len(long)} tokens" in err["message"] and str(model.context_length) in err["message"]
    # the whole context is fine
    assert len(_score(client, long[:-1]).choices[0].logprobs.tokens) == model.context_length


def test_prompt_logprobs_reduces_rows_as_log_softmax():
    """The reduction alone, against a hand-made distribution: rows of known probabilities."""
    p = np.asarray([[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4]] * 9)  # 18 rows: two blocks of 16
    logits = (np.log(p) + 3.0).astype(np.float32)  # a shift changes nothing
    targets = [2, 1] * 9
    lps, tops = prompt_logprobs(logits, targets, 2)
    np.testing.assert_allclose(lps, np.log([0.125, 0.2] * 9), atol=1e-6)
    assert [list(t) for t in tops[:2]] == [[0, 1], [3, 2]]
    np.testing.assert_allclose(list(tops[1].values()), np.log([0.4, 0.3]), atol=1e-6)
    assert len(tops) == 18
    lp, top = token_logprobs(logits[1], 1, 1)  # a generated token's: the same formula, the same floats
    assert lp == lps[1] and top == {3: tops[1][3]}
