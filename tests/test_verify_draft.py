"""The gate's reference side with the artifact's proposals (export/verify_draft.py): what the
reference computes must not depend on what the artifact proposed.

Oracles: `reference.generate.generate` for greedy decoding, the reference's own step-by-step
sampling (no proposal) for the held-out text, and a damaged artifact, which must still fail the gate.
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from runtime import interface as I


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    from export.graph import load_reference

    return load_reference(tiny_ckpt, None, {})


@pytest.fixture(scope="module")
def unaided(lm, tmp_path_factory):
    """The held-out text and logits the reference samples on its own (no tokenizer: sampled)."""
    from export.gate_reference import heldout_tokens

    ids, source, logits, accepted = heldout_tokens(lm, tmp_path_factory.mktemp("no-tokenizer"), lambda m: None)
    assert source.startswith("sampled") and accepted == 0
    return ids, logits


def test_greedy_proposal_accepted_only_where_the_reference_agrees(lm):
    from export.floors import GREEDY_TOKENS
    from export.gate_reference import gate_inputs, reference_greedy
    from reference.generate import generate

    prompt = gate_inputs(lm.cfg.vocab_size)[2]
    want = generate(lm, prompt, GREEDY_TOKENS, do_sample=False)
    assert reference_greedy(lm, prompt, None) == (want, 0)
    assert reference_greedy(lm, prompt, want) == (want, GREEDY_TOKENS)
    wrong = list(want)
    wrong[10] = (wrong[10] + 1) % lm.cfg.vocab_size
    wrong[20:] = [7] * (GREEDY_TOKENS - 20)
    assert reference_greedy(lm, prompt, wrong) == (want, 10)
    assert reference_greedy(lm, prompt, want[:5]) == (want, 0)  # a short proposal is ignored


def test_held_out_proposal_accepted_only_where_the_reference_agrees(lm, unaided, tmp_path):
    from export.gate_reference import HELD_LEN, heldout_tokens

    want_ids, want_logits = unaided
    scale = float(np.abs(want_logits).max())
    ids, _, logits, accepted = heldout_tokens(lm, tmp_path, lambda m: None, want_ids.copy())
    assert accepted == HELD_LEN and np.array_equal(ids, want_ids)
    assert np.abs(logits - want_logits).max() <= 1e-5 * scale  # one forward pass vs the cached steps
    wrong = want_ids.copy()
    wrong[2, 30] = (wrong[2, 30] + 1) % lm.cfg.vocab_size
    wrong[0, 50:] = 3
    ids, _, logits, accepted = heldout_tokens(lm, tmp_path, lambda m: None, wrong)
    assert accepted == 30 and np.array_equal(ids, want_ids)
    assert np.abs(logits - want_logits).max() <= 1e-5 * scale


def test_draw_is_torch_multinomial():
    """The held-out text is what torch.multinomial draws from the same seeded generator (the text the
    gate sampled before proposals existed), and draws follow softmax: 20,000 draws of a 4-way
    distribution, chi-square."""
    import torch

    from export.gate_reference import HELD_LEN, HELD_ROWS, HELD_SEED, draw, held_plan

    V = 1000
    first, noise = held_plan(V)
    g = torch.Generator().manual_seed(HELD_SEED)
    assert np.array_equal(torch.randint(0, V, (HELD_ROWS, 1), generator=g)[:, 0].numpy(), first)
    logits = np.random.default_rng(2).normal(size=(HELD_LEN - 1, HELD_ROWS, V)).astype(np.float32) * 3
    for t in range(HELD_LEN - 1):
        want = torch.multinomial(torch.softmax(torch.from_numpy(logits[t]), -1), 1, generator=g)[:, 0].numpy()
        assert np.array_equal(draw(logits[t], noise[t]), want)

    p = np.array([[0.1, 0.2, 0.3, 0.4]] * 20000)
    counts = np.bincount(draw(np.log(p), torch.empty(p.shape).exponential_(1, generator=torch.Generator().manual_seed(5))),
                         minlength=4)
    expected = 20000 * p[0]
    assert ((counts - expected) ** 2 / expected).sum() < 16.3  # chi-square, 3 dof, p = 0.001


def damage(folder, factor: float = 1.05) -> None:
    """Scale the first MLP up-projection's weights in the shared weights file (every graph reads it)."""
    proto = onnx.load(str(folder / I.MODEL_FILE), load_external_data=False)
    init = next(t for t in proto.graph.initializer if "up_proj" in t.name and t.data_location == onnx.TensorProto.EXTERNAL)
    info = {e.key: e.value for e in init.external_data}
    assert info["location"] == I.DATA_FILE
    data = np.memmap(folder / I.DATA_FILE, np.float32, "r+", int(info.get("offset", 0)), (int(info["length"]) // 4,))
    data *= factor
    data.flush()
    del data


def test_damaged_artifact_proposes_wrong_tokens_and_still_fails(lm, unaided, tiny_artifacts, tmp_path):
    """A perturbed weight: its proposals are corrected by the reference, and the gate fails."""
    from export.floors import GREEDY_TOKENS
    from export.gate_reference import expectations, gate_inputs
    from export.verify import run_gate
    from export.verify_draft import propose
    from reference.generate import generate

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_artifacts("arith"), folder)
    (folder / "tokenizer.json").unlink()  # held-out text sampled, as in `unaided`
    damage(folder)
    proposal = propose(folder, lm.cfg, ["CPUExecutionProvider"])
    prompt = gate_inputs(lm.cfg.vocab_size)[2]
    want = generate(lm, prompt, GREEDY_TOKENS, do_sample=False)
    assert proposal.greedy != want and not np.array_equal(proposal.held_ids, unaided[0])
    e = expectations(lm, folder, lambda m: None, proposal=proposal)
    assert e.greedy_tokens == want and np.array_equal(e.held_ids, unaided[0])
    report = run_gate(folder, e, log=lambda m: None)
    failed = {c.name for c in report.checks if not c.passed}
    assert not report.passed
    assert {"logits max|diff| (batch 2 x 12)", "greedy tokens equal", "kv graph: greedy tokens equal",
            "kv graph: teacher-forced max|diff|"} <= failed
