"""The committed demo model (models/shakespeare): loadable, small, a real recoding, and it has learned.

The oracles are independent of the code under test: the code's injectivity is checked by
enumerating all 65,536 ids in numpy, greedy decoding by a cache-free argmax loop, perplexity and the
unigram baseline by plain log-softmax and counting written here. No test needs the training corpus:
perplexity is measured on verse written for this test (not from the corpus), and the trainer runs
on generated text.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from reference.data import DATA_ENV, DEMO_MODEL_DIR

FOLDER = DEMO_MODEL_DIR
pytestmark = pytest.mark.skipif(not (FOLDER / "model.safetensors").is_file(),
                                reason=f"{FOLDER} has no model.safetensors (run python -m reference.train)")


# Written for this test in the corpus's format (speaker line, verse, blank line); not from the corpus.
PASTICHE = """KING HENRY:
Come hither, cousin, and attend my words.
The night is old, and yet the morning sleeps;
What news from France? Speak plainly, for I fear
The lords are gone to join our enemies.

WESTMORELAND:
My liege, the duke is marching to the coast
With twenty thousand men, and all the town
Doth cry for peace, and yet they arm themselves.

KING HENRY:
Then let them come; we have a cause as good
As ever man did fight for. Call my friends,
And bid them meet me at the castle gate.
I will not stay to hear what they would say.

QUEEN:
O, my good lord, be patient; hear me speak.
I have a son that loves you as his life,
And he will bring you soldiers from the north.
Let not your anger make you lose the day.

KING HENRY:
Madam, I thank you; but the time is short.
Go you to bed, and pray for England's good.
Farewell, sweet queen; we shall meet again.

First Lord:
How now, my lord! what means this sudden haste?

Second Lord:
The king is angry, and the duke is come.
I pray you, sir, what shall we do tonight?

First Lord:
Nothing but wait, and keep our counsel close.
The world is full of danger, and the king
Hath many enemies that wish him dead.
"""


@pytest.fixture(scope="module")
def model():
    from reference.checkpoint import load_model

    torch.manual_seed(0)
    return load_model(FOLDER)


@pytest.fixture(scope="module")
def tok():
    from reference.tokenizer import load_tokenizer
    return load_tokenizer(FOLDER)


def greedy_no_cache(model, ids: list[int], n: int) -> list[int]:
    """Argmax of a full forward over the whole sequence at every step: no KV cache involved."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([out]))
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


def test_folder_files_and_size():
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (FOLDER / name).is_file(), name
    assert (FOLDER / "model.safetensors").stat().st_size <= 20_000_000
    cfg = json.loads((FOLDER / "config.json").read_text())
    assert cfg["model_type"] == "tablefree" and cfg["vocab_size"] == 65536 and cfg["code"]["bits"] == 16
    assert cfg["hidden_size"] % 16 == 0


def test_recoding_is_a_real_affine_bijection(model):
    A = model.code.A.numpy().astype(np.int64)
    b = model.code.b.numpy().astype(np.int64)
    assert A.shape == (16, 16) and b.any() and not np.array_equal(A, np.eye(16, dtype=np.int64))
    ids = np.arange(65536)
    bits = (ids[:, None] >> np.arange(16)) & 1
    codes = ((bits @ A.T + b) % 2) @ (1 << np.arange(16))
    assert len(np.unique(codes)) == 65536  # injective over every id <=> A invertible over GF(2)


def test_tokenizer_round_trip(tok):
    text = "ROMEO:\nWhat say you?"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # the corpus n-grams merge
    assert tok.token_to_id("<s>") == 57345 and tok.token_to_id("R") == ord("R")


def test_greedy_generation_looks_like_a_play(model, tok):
    from reference.generate import generate

    prompt = tok.encode("ROMEO:").ids
    new = generate(model, prompt, 128)
    assert new[:24] == greedy_no_cache(model, prompt, 24)  # KV-cache loop agrees with a cache-free one
    text = tok.decode(new)
    assert "\n" in text
    assert re.search(r"^[A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*)*:$", text, re.MULTILINE), text


def test_perplexity_beats_half_of_any_unigram(model, tok):
    """On unseen verse the model's perplexity is under half that of the best unigram model of that very
    text (its empirical unigram entropy, a lower bound for any unigram fitted elsewhere)."""
    ids = tok.encode(PASTICHE).ids
    T = model.cfg.max_position_embeddings
    nll, n, targets = 0.0, 0, []
    with torch.no_grad():
        for s in range(0, len(ids) - 1, T):
            chunk = torch.tensor(ids[s:s + T + 1])
            logp = torch.log_softmax(model(chunk[:-1].unsqueeze(0))[0][0].double(), -1)
            nll -= logp[torch.arange(len(chunk) - 1), chunk[1:]].sum().item()
            n += len(chunk) - 1
            targets += chunk[1:].tolist()
    counts = Counter(targets)
    best_unigram = math.exp(-sum(c / n * math.log(c / n) for c in counts.values()))
    ppl = math.exp(nll / n)
    assert n > 400 and ppl <= best_unigram / 2, (ppl, best_unigram)


def synthetic_play(seed: int, chars: int = 20000) -> str:
    """Generated text in a play's layout: speaker lines and lines of words from a small lexicon."""
    import random

    rng = random.Random(seed)
    speakers = ["ROMEO", "JULIET", "NURSE", "First Citizen"]
    words = "the and my lord love night day thou art sweet fair come go shall not what is good king".split()
    out: list[str] = []
    while sum(map(len, out)) < chars:
        out.append(f"{rng.choice(speakers)}:\n")
        for _ in range(rng.randint(1, 4)):
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n")
        out.append("\n")
    return "".join(out)


TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--context", "16", "--batch", "2", "--threads", "1",
        "--ngrams2", "64", "--ngrams3", "64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(synthetic_play(0), encoding="utf-8")
    return path


def test_train_script_names_missing_data(monkeypatch, tmp_path, capsys):
    from reference.train import main

    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert main(["--out", str(tmp_path / "out"), "--measure", "1"]) == 2
    assert "tinyshakespeare.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_script_is_reproducible_from_its_seed(capsys, corpus):
    from reference.train import main

    def losses(seed: int) -> list[str]:
        assert main(["--corpus", str(corpus), "--measure", "2", "--seed", str(seed), *TINY]) == 0
        return re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)

    first = losses(3)
    assert len(first) == 2 and first == losses(3) and first != losses(4)


def test_train_script_writes_a_checkpoint_the_reference_reads(tmp_path, capsys, corpus):
    """A short run end to end: the folder loads with reference.checkpoint, its tokenizer round-trips the
    corpus, and the reported perplexity is the full model's, recomputed here with plain log-softmax."""
    from reference.checkpoint import load_model
    from reference.tokenizer import load_tokenizer
    from reference.train import main

    out = tmp_path / "demo"
    assert main(["--corpus", str(corpus), "--out", str(out), "--steps", "3", "--eval-every", "100", *TINY]) == 0
    capsys.readouterr()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "training_results.json"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    tok = load_tokenizer(out)
    text = corpus.read_text(encoding="utf-8")
    held = tok.encode(text[int(len(text) * 0.9):]).ids
    assert tok.decode(held) == text[int(len(text) * 0.9):]
    m = load_model(out)
    assert m.lm_head.weight.dtype == torch.float32 and m.cfg.vocab_size == 65536
    T, nll, n = 16, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(held) - 1, T):
            chunk = torch.tensor(held[s:s + T + 1])
            if len(chunk) < 2:
                break
            logp = torch.log_softmax(m(chunk[:-1].unsqueeze(0))[0][0].double(), -1)
            nll -= logp[torch.arange(len(chunk) - 1), chunk[1:]].sum().item()
            n += len(chunk) - 1
    results = json.loads((out / "training_results.json").read_text())
    assert results["heldout_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-3)
    assert results["greedy_sample"].startswith("ROMEO:")
