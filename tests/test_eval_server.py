"""lm-evaluation-harness as shipped against `python -m runtime serve` (issue 19.2): lm-eval's own
`local-completions` model (its OpenAI client: `echo` + `logprobs` for loglikelihoods, plain
completions for generate_until) on a live server on 127.0.0.1, on the project's offline tasks.

Oracles: the PyTorch reference's own forward for every loglikelihood lm-eval received (the rolling
perplexity documents window by window, as lm-eval cuts them), and the offline `tablefree-onnx`
class run on the same requests (another code path: ONNX Runtime in-process, no HTTP) for the task
scores. lm-eval's API models keep one position for a generated token (`max_length - 1` per request,
rolling windows of `max_length - 2`), so the offline class runs with `max_length=254` to score the
very same windows (docs/evaluation.md).
"""
from __future__ import annotations

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra is not installed: pip install -e '.[eval]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
torch = pytest.importorskip("torch")

import runtime  # noqa: E402
from evaluation import TASK_NAMES, TASKS_DIR  # noqa: E402
from evaluation.lmeval import TableFreeONNX  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.background import BackgroundServer  # noqa: E402
# one oracle and the same fixtures (the demo artifact, the reference model) for both lm-eval paths
from test_eval import demo_dir, reference, reference_loglikelihood  # noqa: E402,F401

NAME = "demo"
CONTEXT = 256  # the demo model's max_position_embeddings
LIMIT = 24  # documents per task: every request kind, in well under a minute per path
API_WINDOW = CONTEXT - 2  # lm-eval's API models: max_length - 1 per request, rolling windows of max_length - 2


def _evaluate(lm) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=list(TASK_NAMES), limit=LIMIT, log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=str(TASKS_DIR)))


@pytest.fixture(scope="module")
def served_run(demo_dir):
    """lm-eval's `local-completions`, built from the same model_args string its CLI takes, against a live server."""
    from lm_eval.api.registry import get_model

    model = runtime.load(demo_dir, provider="cpu", graph="kv", threads=1)
    with BackgroundServer(create_app(model, name=NAME, max_batch=4)) as s:
        args = (f"model={NAME},base_url={s.base_url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={demo_dir},max_length={CONTEXT},batch_size=8,max_retries=1,timeout=120")
        lm = get_model("local-completions").create_from_arg_string(args)
        out = _evaluate(lm)
    return lm, out


@pytest.fixture(scope="module")
def offline_run(demo_dir):
    lm = TableFreeONNX(path=str(demo_dir), threads=1, max_length=API_WINDOW)
    return lm, _evaluate(lm)


def _rolling_reference(reference, lm, text: str) -> tuple[float, float]:
    """A document's log-likelihood by the reference, over lm-eval's own disjoint windows for the API model."""
    from lm_eval import utils as lm_utils

    windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
        token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id, max_seq_len=API_WINDOW, context_len=1))
    total = bound = 0.0
    for ctx, cont in windows:
        value, b = reference_loglikelihood(reference, list(ctx), list(cont), API_WINDOW)
        total, bound = total + value, bound + b
    return total, bound


def test_every_served_loglikelihood_equals_the_reference(served_run, reference):
    lm, out = served_run
    checked = 0
    for task in ("tablefree_mc", "tablefree_cloze"):
        for s in out["samples"][task]:
            for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
                c, k = lm._encode_pair(ctx, cont)  # the ids lm-eval sent, cut as it cuts them
                ref, bound = reference_loglikelihood(reference, c, k, API_WINDOW)
                assert abs(resp[0][0] - ref) <= bound, (task, ctx[-40:], cont, resp[0][0], ref, bound)
                checked += 1
    assert checked >= LIMIT * 4 + LIMIT  # four choices per mc item, one cloze continuation each
    docs = out["samples"]["tablefree_ppl"]
    assert any(len(lm.tok_encode(s["doc"]["text"])) > API_WINDOW for s in docs)  # more than one window
    for s in docs:
        ref, bound = _rolling_reference(reference, lm, s["doc"]["text"])
        assert abs(s["resps"][0][0] - ref) <= bound, (s["resps"][0][0], ref, bound)


def test_served_scores_equal_the_offline_class(served_run, offline_run):
    (_, served), (_, offline) = served_run, offline_run
    for task, metric in (("tablefree_mc", "acc,none"), ("tablefree_mc", "acc_norm,none"),
                         ("tablefree_cloze", "acc,none"), ("tablefree_cloze", "perplexity,none"),
                         ("tablefree_ppl", "bits_per_byte,none"), ("tablefree_ppl", "word_perplexity,none"),
                         ("tablefree_gen", "exact_match,strip")):
        assert served["results"][task][metric] == pytest.approx(offline["results"][task][metric], rel=1e-5), (task, metric)
    # request by request: the same loglikelihoods (float32 logits, other batch shapes) and greedy flags
    for task in ("tablefree_mc", "tablefree_cloze", "tablefree_ppl"):
        for a, b in zip(served["samples"][task], offline["samples"][task], strict=True):
            assert a["arguments"] == b["arguments"]
            got = np.array([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in a["resps"]], float)
            want = np.array([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in b["resps"]], float)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    # generate_until: the server's greedy text is the offline class's
    gens = list(zip(served["samples"]["tablefree_gen"], offline["samples"]["tablefree_gen"], strict=True))
    assert len(gens) == LIMIT
    for a, b in gens:
        assert a["resps"][0][0] == b["resps"][0][0], (a["arguments"][0][0][-60:], a["resps"], b["resps"])
    assert sum(bool(a["resps"][0][0].strip()) for a, _ in gens) >= LIMIT // 2  # the model did generate text
