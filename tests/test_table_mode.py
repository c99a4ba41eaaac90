"""The learned-table sibling (issue 14): a checkpoint WITH an input embedding table exports with the
same tool (lift mode "table", recognised from its tensors), gated like the rest; its lift check
compares the table's rows, and the manifest says the "no V x d table" invariant is waived."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent

from export.build import build  # noqa: E402
from export.errors import ExportError  # noqa: E402


@pytest.fixture(scope="module")
def table_ckpt(tmp_path_factory, bvv241_dir):
    from reference.config import tiny_config
    from reference.factory import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("table") / "ckpt", tiny_config(input_table=True), seed=4,
                           tokenizer_dir=bvv241_dir)


@pytest.fixture(scope="module")
def table_artifact(tmp_path_factory, table_ckpt):
    logs: list[str] = []
    out = build(table_ckpt, tmp_path_factory.mktemp("table_out") / "art", lift_mode="arith", log=logs.append)
    return out, logs


def test_table_checkpoint_exports_in_table_mode_and_passes_the_gate(table_artifact):
    out, logs = table_artifact
    assert any("has an input embedding table [65536, 64]" in m and "lift mode table" in m for m in logs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    assert manifest["lift"]["mode"] == "table" and manifest["lift"]["table"] == [65536, 64]
    assert manifest["lift"]["no_vocab_table"].startswith("waived")
    lift_check = next(c for c in manifest["parity"]["checks"] if c["name"].startswith("lift"))
    assert lift_check["value"] == "65536/65536" and "table's rows" in lift_check["detail"]


def test_the_table_is_in_the_graph_and_the_invariant_would_refuse_it(table_artifact):
    """The waiver is real: the table-free invariant check flags this graph's Gather from a [V, d] table."""
    import onnx

    from graphs.lift import LiftGraphError, check_no_vocab_table

    out, _ = table_artifact
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    with pytest.raises(LiftGraphError, match="input embedding table"):
        check_no_vocab_table(proto, 65536, 64)


def test_artifact_logits_match_the_reference_with_its_table(table_artifact, table_ckpt):
    """Oracle: the reference model on the checkpoint, torch, input rows looked up in its own table."""
    import runtime
    from reference.checkpoint import load_model

    out, _ = table_artifact
    lm = load_model(table_ckpt)
    ids = np.random.default_rng(3).integers(0, 65536, size=(1, 12))
    with torch.no_grad():
        want = lm(torch.as_tensor(ids))[0].numpy()
    got = runtime.load(out, provider="cpu").forward(ids).logits
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_lift_check_catches_a_wrong_table_row(table_artifact, table_ckpt):
    from export.gate_report import Report
    from export.verify import check_lift
    from reference.checkpoint import load_model

    out, _ = table_artifact
    lm = load_model(table_ckpt)
    table = lm.embed_tokens.weight.detach().numpy().copy()
    table[1234, 5] += 1e-3
    report = Report("fp32", "cpu")
    check_lift(report, out / "model.onnx", lm.cfg, ["CPUExecutionProvider"], table=table)
    c = report.checks[0]
    assert not c.passed and c.value == "65535/65536" and "first differing id 1234" in c.detail


def test_table_mode_on_a_table_free_checkpoint_is_refused(tiny_ckpt, tmp_path):
    with pytest.raises(ExportError, match="has no input embedding table"):
        build(tiny_ckpt, tmp_path / "o", lift_mode="table", log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_a_foreign_table_name_is_recognised(table_ckpt, tmp_path):
    """Llama's model.embed_tokens.weight / GPT-2's transformer.wte.weight mark a learned-table checkpoint."""
    from safetensors.torch import load_file, save_file

    from reference.checkpoint import load_checkpoint

    for name in ("model.embed_tokens.weight", "transformer.wte.weight"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        config = json.loads((table_ckpt / "config.json").read_text())
        del config["input_table"]  # the tensor alone tells
        (folder / "config.json").write_text(json.dumps(config))
        sd = load_file(str(table_ckpt / "model.safetensors"))
        sd[name] = sd.pop("embed_tokens.weight")
        save_file(sd, str(folder / "model.safetensors"))
        cfg, state = load_checkpoint(folder)
        assert cfg.input_table and state["embed_tokens.weight"].shape == (65536, 64)


def test_train_input_table_twin_shares_every_other_initial_tensor(tmp_path):
    """`reference.train --input-table` trains the learned-table twin with the table-free run's recipe:
    with lr 0 (so nothing moves) the two checkpoints hold the same value in every tensor they share,
    and the twin's table is the only extra tensor (the project's own task text is the corpus)."""
    from safetensors.torch import load_file

    from reference.train import main as train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(json.loads(line)["text"] for line in
                              (ROOT / "evaluation" / "tasks" / "data" / "ppl.jsonl").read_text().splitlines()))
    common = ["--corpus", str(corpus), "--hidden", "16", "--layers", "1", "--heads", "1", "--context", "16",
              "--batch", "2", "--steps", "2", "--lr", "0", "--ngrams2", "8", "--ngrams3", "8", "--threads", "1"]
    assert train(common + ["--out", str(tmp_path / "free")]) == 0
    assert train(common + ["--out", str(tmp_path / "table"), "--input-table"]) == 0
    free = load_file(str(tmp_path / "free" / "model.safetensors"))
    table = load_file(str(tmp_path / "table" / "model.safetensors"))
    assert set(table) - set(free) == {"embed_tokens.weight"} and set(free) <= set(table)
    for name, t in free.items():
        assert torch.equal(t, table[name]), name
    emb = table["embed_tokens.weight"].float()
    assert emb.shape == (65536, 16) and 0.015 < float(emb.std()) < 0.025  # normal(0, 0.02), its own generator
    assert json.loads((tmp_path / "table" / "config.json").read_text())["input_table"] is True
