"""--trust-remote-code on the published decoder variants (issue 14): parallel residual, partial rotary,
and a block no option describes (post-LN), which must be refused with the stage where the models part.

The oracles are written apart from reference/: tests/remote_code_neox/ (GPT-NeoX names, per-head
fused qkv, msb-first bits, NeoX's rotate_half on rotary_pct of a head; its config class defaults to
a parallel residual and rotary_pct 0.25, as GPT-NeoX's does, so a config.json that omits those keys
leaves the exporter's adapter blind: only the search finds them) and tests/remote_code_gptj/ (GPT-J's
one-norm parallel block, rotate_every_two on half a head, +-1/sqrt(16) code values, a key map).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from export.build import build, load_reference  # noqa: E402
from export.errors import ExportError  # noqa: E402
from test_remote_code import folder_model  # noqa: E402  (the oracle: transformers running the folder's code)

CODE_DIR = Path(__file__).parent / "remote_code_neox"
GPTJ_DIR = Path(__file__).parent / "remote_code_gptj"
D, LAYERS, HEADS, FF, V = 64, 2, 2, 256, 65536


def make_folder(folder: Path, tokenizer_dir: Path, **config_keys) -> Path:
    """A NeoX-style checkpoint folder: own code, NeoX tensor names, only the config keys given."""
    from safetensors.torch import save_file

    from reference.lift import random_invertible_gf2

    folder.mkdir(parents=True)
    for f in CODE_DIR.glob("*.py"):
        shutil.copy(f, folder / f.name)
    config = {"model_type": "neox_code_test", "architectures": ["NeoxCodeForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_neoxcode.NeoxCodeConfig",
                           "AutoModelForCausalLM": "modeling_neoxcode.NeoxCodeForCausalLM"},
              "vocab_size": V, "hidden_size": D, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "intermediate_size": FF, "max_position_embeddings": 128,
              "bos_token_id": 57345, "eos_token_id": 57346, "pad_token_id": 57344, **config_keys}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(11)

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    A, b = random_invertible_gf2(16, seed=5)
    sd = {"gpt_neox.code_A": torch.as_tensor(A, dtype=torch.uint8), "gpt_neox.code_b": torch.as_tensor(b, dtype=torch.uint8),
          "gpt_neox.final_layer_norm.weight": 1 + w(D), "gpt_neox.final_layer_norm.bias": w(D),
          "embed_out.weight": w(V, D, std=0.5)}
    for i in range(LAYERS):
        p = f"gpt_neox.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + w(D), p + "input_layernorm.bias": w(D),
                   p + "post_attention_layernorm.weight": 1 + w(D), p + "post_attention_layernorm.bias": w(D),
                   p + "attention.query_key_value.weight": w(3 * D, D, std=0.3), p + "attention.query_key_value.bias": w(3 * D),
                   p + "attention.dense.weight": w(D, D), p + "attention.dense.bias": w(D),
                   p + "mlp.dense_h_to_4h.weight": w(FF, D, std=0.2), p + "mlp.dense_h_to_4h.bias": w(FF),
                   p + "mlp.dense_4h_to_h.weight": w(D, FF), p + "mlp.dense_4h_to_h.bias": w(D)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def assert_artifact_matches_folder(out: Path, folder: Path) -> None:
    """ONNX Runtime on the artifact vs transformers on the folder: fp32 parity bound, 16 greedy tokens equal."""
    import runtime

    oracle = folder_model(folder)
    ids = np.random.default_rng(1).integers(0, V, size=(1, 20))
    ids[0, :2] = [0, V - 1]
    with torch.no_grad():
        want = oracle(input_ids=torch.as_tensor(ids)).logits.numpy()
    model = runtime.load(out, provider="cpu")
    got = model.forward(ids).logits
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    seq = [int(t) for t in ids[0, :5]]
    with torch.no_grad():
        for _ in range(16):  # the oracle has no cache: greedy by re-running the prefix
            seq.append(int(oracle(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert model.generate([int(t) for t in ids[0, :5]], max_new_tokens=16).ids == seq[5:]


@pytest.mark.slow
def test_parallel_residual_folder_exports_and_matches_its_code(tmp_path, bvv241_dir):
    """config.json omits use_parallel_residual (the code's default is True): the search finds it."""
    folder = make_folder(tmp_path / "neox_parallel", bvv241_dir, rotary_pct=1.0)
    logs: list[str] = []
    out = build(folder, tmp_path / "art", lift_mode="arith", trust_remote_code=True, log=logs.append)
    check = json.loads((out / "manifest.json").read_text())["source"]["remote_code"]
    assert {k: v["now"] for k, v in check["changed"].items()} == {"bit_order": "msb_first", "parallel_residual": True}
    assert [s["differs_at"] for s in check["search_steps"]] == ["the lift", "layers.0's MLP input"]
    assert check["stages"]["agree"] and check["stages"]["stages_total"] == 1 + 5 * LAYERS + 2
    config = json.loads((out / "config.json").read_text())
    assert config["parallel_residual"] is True and config["parallel_norms"] == 2
    assert_artifact_matches_folder(out, folder)


@pytest.mark.slow  # tests/test_remote_code_partial_rotary.py covers a partial-rotary folder in the quick suite
def test_partial_rotary_folder_exports_and_matches_its_code(tmp_path, bvv241_dir):
    """config.json omits rotary_pct (the code's default 0.25) and names the base as NeoX does."""
    folder = make_folder(tmp_path / "neox_rotary", bvv241_dir, use_parallel_residual=False, rotary_emb_base=500)
    out = build(folder, tmp_path / "art", lift_mode="arith", trust_remote_code=True, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["source"]["remote_code"]
    hs = D // HEADS
    assert {k: v["now"] for k, v in check["changed"].items()} == {"bit_order": "msb_first", "rotary_dim": hs // 4}
    assert [s["differs_at"] for s in check["search_steps"]] == ["the lift", "layers.0's attention"]
    config = json.loads((out / "config.json").read_text())
    assert config["rotary_dim"] == hs // 4 and config["rope_theta"] == 500  # the base came from rotary_emb_base
    # the default build ships the shared-cache graph: RoPE on 8 of 32 features ahead of the attention op
    assert manifest["kv_graph"]["file"] == "model.kv.onnx" and manifest["parity"]["passed"]
    assert manifest["kv_graph"]["rotary"].startswith("com.microsoft.RotaryEmbedding")
    assert_artifact_matches_folder(out, folder)


def test_stage_report_names_the_residual_layout(tmp_path, bvv241_dir):
    """Without the search: a parallel block against the sequential reference parts at layers.0's MLP input."""
    from export.remote import load_remote_model, probe_ids, remote_logits
    from export.stages import capture_folder, compare, reference_stages

    folder = make_folder(tmp_path / "neox_parallel", bvv241_dir, rotary_pct=1.0)
    lm = load_reference(folder, None, {"bit_order": "msb_first"})
    ids = probe_ids(V, 128)
    run = capture_folder(load_remote_model(folder), ids, D, lambda m: remote_logits(m, ids))
    rep = compare(reference_stages(lm, ids), run)
    assert rep.stages[rep.first_bad][0] == "layers.0's MLP input"
    assert rep.sentence().startswith("the lift and layers.0's attention input and attention agree; layers.0's MLP input "
                                     "differs"), rep.sentence()
    assert "residual layout is not sequential pre-LN" in rep.sentence()
    # the same weights in the parallel layout: every stage agrees
    full = compare(reference_stages(load_reference(folder, None, {"bit_order": "msb_first",
                                                                  "parallel_residual": True}), ids), run)
    assert full.agrees and full.stages[-1][2] <= 1e-5


def test_post_ln_block_is_refused_naming_the_first_differing_stage(tmp_path, bvv241_dir):
    folder = make_folder(tmp_path / "neox_postln", bvv241_dir, use_parallel_residual=False, rotary_pct=1.0,
                         post_layernorm=True)
    out = tmp_path / "art"
    with pytest.raises(ExportError) as e:
        build(folder, out, lift_mode="arith", trust_remote_code=True, log=lambda m: None)
    msg = str(e.value)
    assert "Stage by stage on the probe ids: the lift agrees; layers.0's attention input differs" in msg, msg
    assert "not pre-LN" in msg and "closest: bit_order lsb_first -> msb_first" in msg and "Nothing was exported" in msg
    assert not out.exists() and not list(tmp_path.glob(".art*"))


# GPT-J tensor names our adapter does not know: the user's key map (SPEC 2) names them
GPTJ_KEY_MAP = {r"transformer\.h\.(\d+)\.attn\.(q|k|v)_proj\.weight": r"layers.\1.attn.\2_proj.weight",
                r"transformer\.h\.(\d+)\.attn\.out_proj\.weight": r"layers.\1.attn.o_proj.weight",
                r"transformer\.h\.(\d+)\.mlp\.fc_in\.(weight|bias)": r"layers.\1.mlp.up_proj.\2",
                r"transformer\.h\.(\d+)\.mlp\.fc_out\.(weight|bias)": r"layers.\1.mlp.down_proj.\2"}


def make_gptj_folder(folder: Path, tokenizer_dir: Path) -> Path:
    """A GPT-J-style folder: one norm per block, no attention biases, config.json without rotary_dim."""
    from safetensors.torch import save_file

    from reference.lift import random_invertible_gf2

    folder.mkdir(parents=True)
    for f in GPTJ_DIR.glob("*.py"):
        shutil.copy(f, folder / f.name)
    config = {"model_type": "gptj_code_test", "architectures": ["GptjCodeForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_gptjcode.GptjCodeConfig",
                           "AutoModelForCausalLM": "modeling_gptjcode.GptjCodeForCausalLM"},
              "vocab_size": V, "n_embd": D, "n_layer": LAYERS, "n_head": HEADS, "n_inner": FF, "n_positions": 128,
              "bos_token_id": 57345, "eos_token_id": 57346, "pad_token_id": 57344}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(13)

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    A, b = random_invertible_gf2(16, seed=9)
    sd = {"transformer.recode_A": torch.as_tensor(A, dtype=torch.uint8),
          "transformer.recode_b": torch.as_tensor(b, dtype=torch.uint8),
          "transformer.ln_f.weight": 1 + w(D), "transformer.ln_f.bias": w(D), "lm_head.weight": w(V, D, std=0.5)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + w(D), p + "ln_1.bias": w(D),
                   **{p + f"attn.{n}_proj.weight": w(D, D, std=0.3) for n in "qkv"},
                   p + "attn.out_proj.weight": w(D, D),
                   p + "mlp.fc_in.weight": w(FF, D, std=0.2), p + "mlp.fc_in.bias": w(FF),
                   p + "mlp.fc_out.weight": w(D, FF), p + "mlp.fc_out.bias": w(D)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.slow
def test_gptj_style_folder_exports_and_matches_its_code(tmp_path, bvv241_dir):
    """One-norm parallel block (recognised from the tensors: no ln2), interleaved partial RoPE, scaled +-1 code."""
    folder = make_gptj_folder(tmp_path / "gptj", bvv241_dir)
    out = build(folder, tmp_path / "art", lift_mode="arith", trust_remote_code=True, key_map=GPTJ_KEY_MAP,
                log=lambda m: None)  # half-head interleaved RoPE: the kv graph too
    check = json.loads((out / "manifest.json").read_text())["source"]["remote_code"]
    hs = D // HEADS
    assert {k: v["now"] for k, v in check["changed"].items()} == {
        "values": "plus_minus_one", "scale": 0.25, "rope_pairing": "interleaved", "rotary_dim": hs // 2,
        "hidden_act": "gelu_tanh"}
    assert [s["differs_at"] for s in check["search_steps"]] == ["the lift", "layers.0's attention", "layers.0's MLP"]
    config = json.loads((out / "config.json").read_text())
    assert config["parallel_residual"] is True and config["parallel_norms"] == 1 and config["attention_bias"] is False
    assert json.loads((out / "manifest.json").read_text())["kv_graph"]["file"] == "model.kv.onnx"
    assert_artifact_matches_folder(out, folder)


def test_stage_sentence_names_whole_blocks_and_the_part_that_differs():
    """Hand-built report: two whole blocks agree, then layers.2's MLP differs after its MLP input agreed."""
    from export.stages import StageReport, stage_name

    kinds = ["attn_in", "attn", "mlp_in", "mlp", "out"]
    names = [("the lift", "lift")] + [(stage_name(k, i), k) for i in range(2) for k in kinds] + \
        [(stage_name(k, 2), k) for k in kinds[:4]]
    rep = StageReport([(n, k, 0.0) for n, k in names[:-1]] + [(names[-1][0], names[-1][1], 0.5)], len(names) - 1, 18)
    assert rep.sentence().startswith("the lift, layers.0-1 and layers.2's attention input, attention and MLP input agree; "
                                     "layers.2's MLP differs (max diff 5.0e-01 of its max|value|): the MLP differs")
    assert rep.score == len(names) - 1 and rep.first_kind == "mlp" and not rep.agrees
    assert rep.to_dict()["first_difference"] == "layers.2's MLP"
