"""lm-evaluation-harness on the artifact (issue 19): the offline `tablefree-onnx` model class runs the
project's offline tasks on the demo artifact, and every log-likelihood lm-eval received is checked
against the PyTorch reference's own forward (log-softmax of its fp32 logits summed over the
continuation) within the fp32 parity bound of docs/parity.md; the task scores are recomputed from the
reference's log-likelihoods; the CLI wrapper gives the same scores; the committed task data is what
its generator writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra is not installed: pip install -e '.[eval]'")
torch = pytest.importorskip("torch")

from evaluation import TASK_NAMES, TASKS_DIR  # noqa: E402
from evaluation.lmeval import TableFreeONNX  # noqa: E402
from evaluation.tasks import make_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARITY = 1e-4  # docs/parity.md: |logit diff| <= 1e-4 x max|logit| in fp32


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    from demo import demo_artifact

    return demo_artifact("arith")


@pytest.fixture(scope="module")
def reference():
    from reference.checkpoint import load_model

    return load_model(ROOT / "models" / "shakespeare")


@pytest.fixture(scope="module")
def offline_run(demo_dir):
    """One simple_evaluate of every offline task through the offline class, samples kept."""
    from lm_eval.tasks import TaskManager

    lm = TableFreeONNX(path=str(demo_dir), threads=1, batch_tokens=1024)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASK_NAMES), task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                  log_samples=True, bootstrap_iters=0)
    return lm, out


def reference_loglikelihood(model, ctx: list[int], cont: list[int], max_length: int) -> tuple[float, float]:
    """(sum log p(cont | ctx), the parity bound for it) from the reference's fp32 logits."""
    whole = (ctx + cont)[-(max_length + 1):]
    k = min(len(cont), len(whole) - 1)
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0][0].double()  # [len - 1, V]
    logp = torch.log_softmax(logits[-k:], -1)
    value = float(logp.gather(-1, torch.tensor(whole[-k:])[:, None]).sum())
    # a logit error e moves a log-softmax by at most 2e; k tokens add up
    return value, 2 * k * PARITY * float(logits.abs().max())


def test_task_data_is_what_the_generator_writes(tmp_path):
    make_tasks.build(tmp_path)
    for f in ("mc.jsonl", "cloze.jsonl", "ppl.jsonl"):
        assert (tmp_path / f).read_bytes() == (TASKS_DIR / "data" / f).read_bytes(), f


def test_every_loglikelihood_equals_the_reference(offline_run, reference):
    lm, out = offline_run
    assert len(lm.history) > 300
    worst = 0.0
    ref_of: dict[tuple, float] = {}
    for ctx, cont, value, _ in lm.history:
        ref, bound = reference_loglikelihood(reference, ctx, cont, lm.max_length)
        assert abs(value - ref) <= bound, (ctx[-5:], cont, value, ref, bound)
        worst = max(worst, abs(value - ref))
        ref_of[(tuple(ctx), tuple(cont))] = ref
    assert worst < 1e-3
    # what lm-eval scored is what the class computed: each mc/cloze response is one history entry
    for task in ("tablefree_mc", "tablefree_cloze"):
        for s in out["samples"][task]:
            for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
                c, k = lm._encode_pair(ctx, cont)
                assert resp[0][0] == pytest.approx(ref_of[(tuple(c), tuple(k))], abs=1e-3)


def test_task_scores_equal_the_reference_scores(offline_run, reference):
    lm, out = offline_run
    res = out["results"]
    # multiple choice: the reference's argmax over the choices' log-likelihoods
    hits, docs = 0, out["samples"]["tablefree_mc"]
    for s in docs:
        lls = [reference_loglikelihood(reference, *lm._encode_pair(ctx, cont), lm.max_length)[0]
               for ctx, cont in s["arguments"]]
        hits += int(np.argmax(lls) == s["doc"]["label"])
    assert res["tablefree_mc"]["acc,none"] == pytest.approx(hits / len(docs))
    assert len(docs) == 80 and 0.25 < hits / len(docs) <= 1.0
    # perplexity task: the documents' total log-likelihood, by the reference over the same windows
    ppl_docs = out["samples"]["tablefree_ppl"]
    total = sum(s["resps"][0][0] for s in ppl_docs)
    n_bytes = sum(len(s["doc"]["text"].encode()) for s in ppl_docs)
    assert res["tablefree_ppl"]["bits_per_byte,none"] == pytest.approx(-total / n_bytes / np.log(2), rel=1e-9)
    longest = max(len(lm.tok_encode(s["doc"]["text"])) for s in ppl_docs)
    assert longest > lm.max_length  # the rolling windows were exercised
    # generate_until: greedy text equals the reference's greedy continuation on a few prompts
    from reference.generate import generate

    for s in out["samples"]["tablefree_gen"][:5]:
        ids = lm.tok_encode(s["arguments"][0][0])
        ref_text = lm.tok_decode(generate(reference, ids, 8))
        got = s["resps"][0][0]
        assert ref_text.startswith(got), (got, ref_text)


@pytest.mark.slow
def test_cli_wrapper_gives_the_same_scores(offline_run, demo_dir, tmp_path):
    _, out = offline_run
    cmd = [sys.executable, "-m", "evaluation", "--model", "tablefree-onnx", "--model_args", f"path={demo_dir},threads=1",
           "--tasks", "tablefree_mc", "tablefree_cloze", "--output_path", str(tmp_path / "res")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's packages, from another folder (the data paths are the package's)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    files = list((tmp_path / "res").rglob("results_*.json"))
    assert len(files) == 1, r.stdout[-2000:]
    cli = json.loads(files[0].read_text())["results"]
    for task, metric in (("tablefree_mc", "acc,none"), ("tablefree_mc", "acc_norm,none"),
                         ("tablefree_cloze", "perplexity,none"), ("tablefree_cloze", "acc,none")):
        assert cli[task][metric] == pytest.approx(out["results"][task][metric], rel=1e-6), (task, metric)  # other batches: float sums in another order

