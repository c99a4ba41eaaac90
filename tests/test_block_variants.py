"""The published decoder variants as reference options (issue 14): exported, traced and gated like the seed.

Factory checkpoints of each variant go through the whole build; the parity gate (ONNX Runtime on
the artifact against the reference, SPEC 5) must pass. The variants' formulas themselves are
checked against independently written model code in tests/test_remote_code_variants.py.
"""
from __future__ import annotations

import json

import pytest

from reference.config import ConfigError, ModelConfig, tiny_config

VARIANTS = {
    # GPT-NeoX: parallel residual, two norms, RoPE (rotate_half) on a quarter of each head, its own base
    "neox": dict(parallel_residual=True, parallel_norms=2, rotary_dim=4, rope_theta=500.0),
    # GPT-J: parallel residual, one norm for both branches, interleaved RoPE on half of each head
    "gptj": dict(parallel_residual=True, parallel_norms=1, rotary_dim=8, rope_pairing="interleaved"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_exports_and_passes_the_gate(name, tmp_path, bvv241_dir):
    from export.build import build
    from reference.factory import make_checkpoint

    cfg = tiny_config(**VARIANTS[name])
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg, seed=2, tokenizer_dir=bvv241_dir)
    out = build(ckpt, tmp_path / "art", lift_mode="arith", log=lambda m: None)  # the default: the kv graph too
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    checks = {c["name"]: c for c in manifest["parity"]["checks"]}
    assert checks["greedy tokens equal"]["value"] >= 16
    config = json.loads((out / "config.json").read_text())
    for key, value in VARIANTS[name].items():
        assert config[key] == value
    if name == "gptj":  # one norm per block: the checkpoint holds no ln2 and is recognised by that
        from reference.checkpoint import load_checkpoint

        cfg2, sd = load_checkpoint(ckpt)
        assert not any(".ln2." in k for k in sd) and cfg2.parallel_residual and cfg2.parallel_norms == 1


def test_config_adapter_reads_the_common_names():
    hs = 64 // 4
    neox = ModelConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 65536,
                                  "rotary_pct": 0.25, "rotary_emb_base": 500, "use_parallel_residual": True})
    assert (neox.rotary_dim, neox.rope_theta, neox.parallel_residual) == (hs // 4, 500, True)
    phi = ModelConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
                                 "rope_base": 20000})
    assert (phi.rotary_dim, phi.rope_theta) == (hs // 2, 20000)
    gptj = ModelConfig.from_dict({"n_embd": 64, "n_head": 4, "rotary_dim": 8})
    assert gptj.rotary_dim == 8 and gptj.rope_dim == 8
    assert ModelConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "rotary_pct": 1.0}).rotary_dim is None
    falcon = ModelConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "parallel_attn": True})
    assert falcon.parallel_residual and falcon.parallel_norms == 2


@pytest.mark.parametrize("over, words", [
    (dict(rotary_dim=5), "rotary_dim = 5"),
    (dict(rotary_dim=32), "rotary_dim = 32"),
    (dict(parallel_norms=3), "parallel_norms = 3"),
    (dict(parallel_residual="yes"), "parallel_residual"),
])
def test_variant_fields_are_validated(over, words):
    with pytest.raises(ConfigError, match=words):
        tiny_config(**over).validate()
