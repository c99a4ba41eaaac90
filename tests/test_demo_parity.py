"""The embedded Shakespeare model through the whole product: export in every lift mode, then
128 greedy tokens from ONNX Runtime equal the PyTorch reference's, token for token (issue 5).

A trained model is where greedy parity means something: its logits have clear winners, unlike
random weights whose near-ties can flip on float rounding.
"""
from __future__ import annotations

import pytest

import runtime
from reference.data import DEMO_MODEL_DIR
from runtime import interface as I

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed"]


@pytest.fixture(scope="module")
def demo_ref():
    from reference.checkpoint import load_model

    return load_model(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def demo_artifacts():
    """mode -> the demo model's fp32 artifact, built once per test process (tests/demo.py: the front-end
    and server tests read the same folders)."""
    from demo import demo_artifact

    return demo_artifact


# arith in the quick suite; the other lifts (each exhaustively equal to SPEC in test_graph_lift) run in `make test-slow`
@pytest.mark.parametrize("mode", [m if m == "arith" else pytest.param(m, marks=pytest.mark.slow) for m in I.LIFT_MODES])
def test_demo_greedy_128_tokens_equal_reference(demo_artifacts, demo_ref, mode):
    from reference.generate import generate

    m = runtime.load(demo_artifacts(mode), provider="cpu")
    for prompt in PROMPTS:
        ids = m.encode(prompt)
        want = generate(demo_ref, ids, 128, eos_token_id=m.eos_token_ids)
        got = m.generate(ids, max_new_tokens=128)
        assert got.ids == want, f"{mode}: first difference at token {next(i for i, (a, b) in enumerate(zip(got.ids, want)) if a != b)}"
        assert len(got.ids) == 128
    # and the text shows what the model learned: a speaker line after a line break
    text = m.generate("ROMEO:", max_new_tokens=128).text
    assert "\n" in text and any(line.rstrip().endswith(":") and line[:1].isupper() for line in text.splitlines()[1:])


def test_demo_batch_rows_equal_solo(demo_artifacts):
    m = runtime.load(demo_artifacts("arith"), provider="cpu")
    batch = m.generate(PROMPTS, max_new_tokens=48)
    for prompt, row in zip(PROMPTS, batch):
        assert row.ids == m.generate(prompt, max_new_tokens=48).ids


# slow: the floors are also held on every quantized build of the tiny model (test_export) and by the demo GPTQ
# int4 build (test_quantize_gptq); this is the trained model's second measure, run by `make test-slow`
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_demo_quantized_builds_meet_their_floors(tmp_path, precision):
    """The floors of export/floors.py hold on the trained model, with the runtime's own scoring as
    a second, independent measure: held-out-like text scores within the floor's perplexity ratio."""
    import json

    from export.build import build
    from export.floors import floors_for

    folder = build(DEMO_MODEL_DIR, tmp_path / precision, lift_mode="arith", precision=precision, log=lambda m: None)
    checks = {c["name"]: c for c in json.loads((folder / I.MANIFEST_FILE).read_text())["parity"]["checks"]}
    fl = floors_for(precision)
    assert checks["top-1 agreement"]["value"] >= fl["top1"]
    assert checks["perplexity ratio"]["value"] <= fl["ppl_ratio"]

    fp32 = runtime.load(build(DEMO_MODEL_DIR, tmp_path / "fp32", lift_mode="arith", log=lambda m: None), provider="cpu")
    quant = runtime.load(folder, provider="cpu")
    text = fp32.generate("KING HENRY VI:\n", max_new_tokens=200, do_sample=True, temperature=0.8, seed=3).text
    ratio = quant.score(text).perplexity / fp32.score(text).perplexity
    assert ratio <= fl["ppl_ratio"], f"{precision}: perplexity ratio {ratio:.3f} on sampled text"
