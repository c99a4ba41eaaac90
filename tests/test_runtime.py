"""The ONNX Runtime loop against the torch reference: greedy tokens, batches, the KV cache, scores,
streaming, threads, and a process where torch cannot be imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import runtime
from runtime import interface as I

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    from reference.checkpoint import load_model

    return load_model(tiny_ckpt)


@pytest.fixture(scope="module", params=["kv", "spec"])
def model(tiny_artifacts, request):
    """Both graphs of the artifact: model.kv.onnx (shared cache, single prompts) and model.onnx."""
    return runtime.load(tiny_artifacts("bitwise"), provider="cpu", graph=request.param)


def ref_logits(ref, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits, _ = ref(torch.tensor([ids], dtype=torch.int64))
    return logits[0].double().numpy()


@pytest.mark.parametrize("graph", ["kv", "spec"])
@pytest.mark.parametrize("mode", I.LIFT_MODES)
def test_greedy_64_tokens_equal_reference(tiny_artifacts, ref, mode, graph):
    from reference.generate import generate

    m = runtime.load(tiny_artifacts(mode), provider="cpu", graph=graph)
    ids = m.encode(PROMPT)
    want = generate(ref, ids, 64, eos_token_id=m.eos_token_ids)
    got = m.generate(ids, max_new_tokens=64)
    assert got.ids == want
    assert len(got.ids) == 64 or got.finish_reason == "eos"
    assert got.prompt_ids == ids
    # text in, text out: same tokens, and the text is their decoding
    by_text = m.generate(PROMPT, max_new_tokens=64)
    assert by_text.ids == want and by_text.text == m.decode(want)


def test_batch_of_four_rows_equal_each_alone_and_reference(model, ref):
    from reference.generate import generate

    prompts = ["A", "First Citizen:", "Before we proceed any further, hear me speak.", "All: Speak, speak."]
    lengths = {len(model.encode(p)) for p in prompts}
    assert len(lengths) == 4, "the prompts must differ in length so that left padding is exercised"
    batch = model.generate(prompts, max_new_tokens=24)
    assert isinstance(batch, list) and len(batch) == 4
    for p, row in zip(prompts, batch):
        alone = model.generate(p, max_new_tokens=24)
        assert row.ids == alone.ids and row.text == alone.text
        assert row.ids == generate(ref, model.encode(p), 24, eos_token_id=model.eos_token_ids)


def test_forward_teacher_forcing_through_cache_matches_full_forward(model, ref):
    ids = model.encode(PROMPT)
    full = ref_logits(ref, ids)
    scale = np.abs(full).max()
    out = model.forward(np.asarray([ids[:3]], np.int64))
    assert np.abs(out.logits[0] - full[:3]).max() <= 1e-4 * scale
    past = out.past_key_values
    for t in range(3, len(ids)):
        out = model.forward(np.asarray([[ids[t]]], np.int64), np.ones((1, t + 1), np.int64),
                            np.asarray([[t]], np.int64), past)
        assert np.abs(out.logits[0, 0] - full[t]).max() <= 1e-4 * scale, f"step {t}"
        past = out.past_key_values
    assert tuple(past[0].shape()) == (1, model.num_heads, len(ids), model.head_size)


def test_forward_accepts_numpy_past(model, ref):
    """Low-level users may keep the cache as numpy; it must give the same logits as OrtValues."""
    ids = model.encode(PROMPT)[:6]
    first = model.forward(np.asarray([ids[:5]], np.int64))
    as_np = [np.asarray(p.numpy()) for p in first.past_key_values]
    a = model.forward(np.asarray([ids[5:]], np.int64), None, None, as_np).logits
    b = model.forward(np.asarray([ids[5:]], np.int64), None, None, first.past_key_values).logits
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0, 0] - ref_logits(ref, ids)[5]).max() <= 1e-4 * np.abs(a).max()


def test_score_perplexity_equals_reference(model, ref):
    text = "First Citizen: Before we proceed any further, hear me speak."
    r = model.score(text)
    ids = model.encode(text)
    assert r.ids == ids and len(r.token_logprobs) == len(ids) - 1
    lp = torch.log_softmax(torch.tensor(ref_logits(ref, ids)), -1).numpy()
    want = np.array([lp[i, ids[i + 1]] for i in range(len(ids) - 1)])
    np.testing.assert_allclose(r.token_logprobs, want, rtol=0, atol=1e-4)
    want_ppl = float(np.exp(-want.mean()))
    assert abs(r.perplexity - want_ppl) <= 1e-4 * want_ppl


def test_score_longer_than_context_uses_windows(model, ref):
    """Windows of context length overlapping by one token: every token after the first is scored once."""
    C = model.context_length
    ids = (model.encode("All: Content, content. ") * 40)[: 2 * C + 17]
    r = model.score(ids)
    assert len(r.token_logprobs) == len(ids) - 1
    want = []
    for start in range(0, len(ids) - 1, C - 1):
        w = ids[start : start + C]
        lp = torch.log_softmax(torch.tensor(ref_logits(ref, w)), -1).numpy()
        want += [lp[i, w[i + 1]] for i in range(len(w) - 1)]
    np.testing.assert_allclose(r.token_logprobs, np.array(want), rtol=0, atol=1e-4)


def test_stream_joined_equals_generate(model):
    for kw in ({}, {"do_sample": True, "seed": 5, "temperature": 0.8, "top_k": 50},
               {"do_sample": True, "seed": 11, "top_p": 0.9, "repetition_penalty": 1.3}):
        pieces = list(model.stream(PROMPT, max_new_tokens=40, **kw))
        whole = model.generate(PROMPT, max_new_tokens=40, **kw)
        assert "".join(pieces) == whole.text, kw
        assert len(pieces) > 1 and all(pieces)
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_detokenizer_never_splits_a_character():
    """A byte-level BPE splits a multi-byte character across tokens: no piece may hold U+FFFD,
    and the pieces join to exactly the full decode (the oracle)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from runtime.detok import IncrementalDetokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "naïve café — 日本語 🤖 ok"
    ids = tok.encode(text).ids
    assert len(ids) > len(text), "each byte must be its own token for this test to mean anything"
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") >= 6  # held back while 🤖 (4 bytes) and the CJK characters were incomplete


def test_generate_in_a_process_where_torch_cannot_be_imported(model, tmp_path):
    fake = tmp_path / "fake"
    for name in ("torch", "reference", "export", "graphs"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    want = model.generate(PROMPT, max_new_tokens=16)
    code = textwrap.dedent(f"""
        import json, sys, warnings
        warnings.simplefilter("ignore")
        import runtime
        m = runtime.load({str(model.info.folder)!r})
        r = m.generate({PROMPT!r}, max_new_tokens=16)
        blocked = [k for k in ("torch", "reference", "export", "graphs") if k in sys.modules]
        print(json.dumps({{"ids": r.ids, "text": r.text, "blocked": blocked}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ids"] == want.ids and got["text"] == want.text
    assert got["blocked"] == []


def test_one_session_shared_by_eight_threads(model):
    prompts = ["A", "First Citizen:", "MENENIUS:", "We are accounted poor citizens", "Hear me",
               "O, ", "Speak, speak.", "You are all resolved rather to die than to famish?"]
    kws = [dict(max_new_tokens=20)] * 4 + [dict(max_new_tokens=20, do_sample=True, seed=s, top_k=40) for s in range(4)]
    serial = [model.generate(p, **kw).ids for p, kw in zip(prompts, kws)]
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            results[i] = model.generate(prompts[i], **kws[i]).ids
            if results[i] != serial[i]:
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_provider_reported_and_auto_warns_once(tiny_artifacts, monkeypatch):
    import onnxruntime as ort

    import runtime.sessions as rs

    m = runtime.load(tiny_artifacts("bitwise"), provider="cpu", threads=1)
    assert m.provider == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is installed here: auto does not fall back")
    monkeypatch.setattr(rs, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert runtime.load(tiny_artifacts("bitwise")).provider == "CPUExecutionProvider"
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "onnxruntime-gpu" in msgs[0]


def test_cli_generate_and_score(model, tmp_path):
    folder = str(model.info.folder)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    graph = "kv" if model.kv_session is not None else "spec"  # the same graph as the fixture's model
    run = lambda *a: subprocess.run([sys.executable, "-m", "runtime", *a, "--graph", graph], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=120)
    g = run("generate", "--model", folder, "--prompt", PROMPT, "--max-new-tokens", "12", "--provider", "cpu")
    assert g.returncode == 0, g.stderr
    assert g.stdout == model.generate(PROMPT, max_new_tokens=12).text + "\n"
    s = run("generate", "--model", folder, "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "3", "--stream")
    assert s.returncode == 0, s.stderr
    assert s.stdout == model.generate(PROMPT, max_new_tokens=12, do_sample=True, seed=3).text + "\n"
    f = tmp_path / "t.txt"
    f.write_text("First Citizen: Before we proceed any further, hear me speak.", encoding="utf-8")
    sc = run("score", "--model", folder, "--file", str(f))
    assert sc.returncode == 0, sc.stderr
    ppl = float(sc.stdout.split("perplexity")[1])
    assert abs(ppl - model.score(f.read_text(encoding="utf-8")).perplexity) <= 1e-5 * ppl
    h = run("generate", "--help")
    assert h.returncode == 0 and "--max-new-tokens" in h.stdout and "greedy" in h.stdout.lower()


def test_kv_graph_serves_generation_and_spec_graph_opens_only_for_forward(tiny_artifacts, ref):
    """graph="auto": one session (the shared-cache graph) for generate, stream, score and batches;
    model.onnx opens only when `forward` (the SPEC 3 interface) is called."""
    from reference.generate import generate

    m = runtime.load(tiny_artifacts("arith"), provider="cpu")
    assert m.kv_session is not None and m._spec is None
    ids = m.encode(PROMPT)
    assert m.generate(ids, max_new_tokens=24).ids == generate(ref, ids, 24, eos_token_id=m.eos_token_ids)
    m.score(PROMPT)
    "".join(m.stream(PROMPT, max_new_tokens=8))
    prompts = [PROMPT, "Once", "A long time ago, in a galaxy far away"]
    rows = m.generate(prompts, max_new_tokens=12)  # right-padded batch on the kv graph
    assert m._spec is None
    for p, r in zip(prompts, rows):
        pid = m.encode(p)
        assert r.ids == generate(ref, pid, 12, eos_token_id=m.eos_token_ids)
    m.forward(np.array([ids], np.int64))
    assert m._spec is not None


def test_artifact_without_kv_graph(tiny_ckpt, tmp_path):
    from export.build import build

    out = build(tiny_ckpt, tmp_path / "nokv", lift_mode="arith", verify=False, kv_graph=False, log=lambda m: None)
    assert not (out / I.KV_MODEL_FILE).exists()
    assert json.loads((out / I.MANIFEST_FILE).read_text())["kv_graph"]["file"] is None
    m = runtime.load(out, provider="cpu")  # auto: model.onnx serves everything
    assert m.kv_session is None and len(m.generate(PROMPT, max_new_tokens=4).ids) == 4
    with pytest.raises(runtime.RuntimeArtifactError, match="no model.kv.onnx"):
        runtime.load(out, provider="cpu", graph="kv")
    with pytest.raises(runtime.InputError, match="graph="):
        runtime.load(out, provider="cpu", graph="shared")
