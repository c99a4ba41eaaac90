"""Checkpoint folders: round trips, foreign layouts, the factory, and every bad input of this layer.

Oracles: the official `safetensors` library (reads what we write, writes what foreign folders
hold), and a canonical TableFreeLM built in memory, whose logits a foreign folder must reproduce
after its tensors were renamed / fused by the test itself.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reference.checkpoint import CheckpointError, load_checkpoint, load_model, read_header, save_checkpoint
from reference.config import CodeConfig, tiny_config
from reference.factory import make_checkpoint
from reference.lift import random_invertible_gf2
from reference.model import TableFreeLM

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[57345, 104, 101, 65535, 0, 4242, 31337], [9, 8, 7, 6, 5, 4, 3]])


def affine_cfg(seed: int = 1, **kw):
    A, b = random_invertible_gf2(16, seed=seed)
    return tiny_config(code=CodeConfig(A=A, b=b), **kw)


def canonical_model(cfg, seed: int = 0) -> TableFreeLM:
    model = TableFreeLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("ln" in name and name.endswith("weight")) else 0.0
            p.copy_(base + 0.15 * torch.randn(p.shape, generator=g))
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]


def one_line_error(folder, match: str | list[str], key_map=None) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(folder, key_map=key_map)
    msg = str(info.value)
    assert "\n" not in msg
    for m in [match] if isinstance(match, str) else match:
        assert m in msg, f"{m!r} not in: {msg}"
    return msg


# -- round trips ------------------------------------------------------------------------------
def test_round_trip_single_file(tmp_path):
    cfg = affine_cfg()
    model = canonical_model(cfg)
    save_checkpoint(tmp_path, cfg, model.state_dict())
    on_disk = load_file(tmp_path / "model.safetensors")  # the official reader accepts our writer
    sd = model.state_dict()
    assert set(on_disk) == set(sd)
    assert all(torch.equal(on_disk[k], sd[k]) for k in sd)
    assert on_disk["code.A"].dtype == torch.uint8
    loaded = load_model(tmp_path)
    assert not loaded.training
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(logits(loaded), logits(model))
    np.testing.assert_array_equal(loaded.cfg.code.A, cfg.code.A)


def test_round_trip_shards_and_stale_files(tmp_path):
    cfg = affine_cfg()
    model = canonical_model(cfg, seed=4)
    save_checkpoint(tmp_path, cfg, model.state_dict(), shard_size_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    sd = model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    for shard in shards:  # each shard stays under the limit unless it holds one big tensor
        tensors = load_file(shard)
        assert all(index["weight_map"][k] == shard.name and torch.equal(v, sd[k]) for k, v in tensors.items())
        assert len(tensors) == 1 or shard.stat().st_size <= 100_000 + 10_000
    assert torch.equal(logits(load_model(tmp_path)), logits(model))
    save_checkpoint(tmp_path, cfg, sd)  # single file again: old shards and index must go
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


# -- foreign layouts --------------------------------------------------------------------------
def write_foreign(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def nanogpt_tensors(sd: dict, L: int, prefix: str = "") -> dict:
    out = {}
    for i in range(L):
        p, q = f"layers.{i}", f"{prefix}transformer.h.{i}"
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2"), ("attn.o_proj", "attn.c_proj"),
                             ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            for part in ("weight", "bias"):
                out[f"{q}.{theirs}.{part}"] = sd[f"{p}.{ours}.{part}"]
        for part in ("weight", "bias"):  # nn.Linear layout: [3d, d] = q rows, then k, then v
            out[f"{q}.attn.c_attn.{part}"] = torch.cat([sd[f"{p}.attn.{n}_proj.{part}"] for n in "qkv"])
        out[f"{q}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))  # nanoGPT's causal-mask buffer
    out[f"{prefix}transformer.ln_f.weight"] = sd["ln_f.weight"]
    out[f"{prefix}transformer.ln_f.bias"] = sd["ln_f.bias"]
    out[f"{prefix}lm_head.weight"] = sd["lm_head.weight"]
    out[f"{prefix}binary_code.matrix"] = sd["code.A"]  # A / b under names the adapter has never seen
    out[f"{prefix}binary_code.offset"] = sd["code.b"]
    return out


def test_nanogpt_folder_gives_canonical_logits(tmp_path):
    cfg = affine_cfg(seed=2)
    model = canonical_model(cfg, seed=1)
    config = {"model_type": "gpt", "n_embd": 64, "n_layer": 2, "n_head": 4, "block_size": 128, "vocab_size": 65536, "bias": True}
    folder = write_foreign(tmp_path / "nanogpt", config, nanogpt_tensors(model.state_dict(), 2, prefix="_orig_mod."))
    loaded = load_model(folder)
    np.testing.assert_array_equal(loaded.cfg.code.A, cfg.code.A)
    np.testing.assert_array_equal(loaded.cfg.code.b, cfg.code.b)
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-6


def test_llama_folder_without_biases_and_code_in_config(tmp_path):
    cfg = affine_cfg(seed=3, norm_type="rmsnorm", attention_bias=False, mlp_bias=False, norm_bias=False)
    model = canonical_model(cfg, seed=2)
    sd = model.state_dict()
    t = {"lm_head.weight": sd["lm_head.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(2):
        p, q = f"layers.{i}", f"model.layers.{i}"
        for n in "qkvo":
            t[f"{q}.self_attn.{n}_proj.weight"] = sd[f"{p}.attn.{n}_proj.weight"]
        t[f"{q}.input_layernorm.weight"] = sd[f"{p}.ln1.weight"]
        t[f"{q}.post_attention_layernorm.weight"] = sd[f"{p}.ln2.weight"]
        up, down = ("up_proj", "down_proj") if i == 0 else ("fc1", "fc2")
        t[f"{q}.mlp.{up}.weight"] = sd[f"{p}.mlp.up_proj.weight"]
        t[f"{q}.mlp.{down}.weight"] = sd[f"{p}.mlp.down_proj.weight"]
        t[f"{q}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # a cached buffer, dropped
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 256, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
              "vocab_size": 65536, "norm_type": "rmsnorm",
              "code": {"A": cfg.code.A.tolist(), "b": cfg.code.b.tolist()}}  # says nothing about biases
    loaded = load_model(write_foreign(tmp_path / "llama", config, t))
    assert (loaded.cfg.attention_bias, loaded.cfg.mlp_bias, loaded.cfg.norm_bias) == (False, False, False)
    np.testing.assert_array_equal(loaded.cfg.code.A, cfg.code.A)
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-6


def test_neox_folder_with_per_head_fused_qkv(tmp_path):
    cfg = affine_cfg(seed=4)
    model = canonical_model(cfg, seed=3)
    sd = model.state_dict()
    H, hs, d = 4, 16, 64
    t = {"embed_out.weight": sd["lm_head.weight"], "gpt_neox.code_A": sd["code.A"], "gpt_neox.code_b": sd["code.b"]}
    for part in ("weight", "bias"):
        t[f"gpt_neox.final_layer_norm.{part}"] = sd[f"ln_f.{part}"]
    for i in range(2):
        p, q = f"layers.{i}", f"gpt_neox.layers.{i}"
        for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"), ("attn.o_proj", "attention.dense"),
                             ("mlp.up_proj", "mlp.dense_h_to_4h"), ("mlp.down_proj", "mlp.dense_4h_to_h")):
            for part in ("weight", "bias"):
                t[f"{q}.{theirs}.{part}"] = sd[f"{p}.{ours}.{part}"]
        for part in ("weight", "bias"):  # NeoX: rows grouped per head as [q_h, k_h, v_h]
            qkv = torch.stack([sd[f"{p}.attn.{n}_proj.{part}"].reshape(H, hs, *([d] if part == "weight" else [])) for n in "qkv"], 1)
            t[f"{q}.attention.query_key_value.{part}"] = qkv.reshape(3 * d, *([d] if part == "weight" else []))
    config = {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 256, "vocab_size": 65536, "layer_norm_eps": 1e-5}
    loaded = load_model(write_foreign(tmp_path / "neox", config, t))
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-6


def test_unmappable_tensors_listed_then_key_map_loads(tmp_path):
    cfg = affine_cfg(seed=5)
    model = canonical_model(cfg, seed=5)
    sd = model.state_dict()
    renames = {"ln1": "norm1", "ln2": "norm2", "attn.q_proj": "wq", "attn.k_proj": "wk", "attn.v_proj": "wv",
               "attn.o_proj": "wo", "mlp.up_proj": "ff_in", "mlp.down_proj": "ff_out"}
    t = {"code.A": sd["code.A"], "code.b": sd["code.b"], "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"],
         "lm_head.weight": sd["lm_head.weight"]}
    for i in range(2):
        for ours, theirs in renames.items():
            for part in ("weight", "bias"):
                t[f"blocks.{i}.{theirs}.{part}"] = sd[f"layers.{i}.{ours}.{part}"]
    folder = write_foreign(tmp_path / "custom", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                 "intermediate_size": 256, "vocab_size": 65536}, t)
    foreign = sorted(k for k in t if k.startswith("blocks."))
    msg = one_line_error(folder, ["--key-map FILE.json", f"{len(foreign)} tensor(s)"])
    assert all(name in msg for name in foreign)
    key_map = {rf"blocks\.(\d+)\.{theirs}\.(weight|bias)": rf"layers.\1.{ours}.\2" for ours, theirs in renames.items()}
    (tmp_path / "map.json").write_text(json.dumps(key_map))
    assert torch.equal(logits(load_model(folder, key_map=tmp_path / "map.json")), logits(model))
    # an exact name works too, and a wrong target is refused
    with pytest.raises(CheckpointError, match="not a canonical tensor name"):
        load_model(folder, key_map={**key_map, "blocks.0.norm1.weight": "layers.0.norm.weight"})


# -- dtypes and the factory ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoint_loads_as_fp32(tmp_path, dtype):
    folder = make_checkpoint(tmp_path / dtype, affine_cfg(), seed=3, dtype=dtype)
    stored = load_file(folder / "model.safetensors")
    assert stored["lm_head.weight"].dtype == getattr(torch, dtype)
    model = load_model(folder)
    for k, v in model.state_dict().items():
        assert v.dtype == (torch.uint8 if k.startswith("code.") else torch.float32)
        assert torch.equal(v, stored[k].to(v.dtype))
    fp32 = load_model(make_checkpoint(tmp_path / "fp32", affine_cfg(), seed=3))
    rel = (logits(model) - logits(fp32)).abs().max() / logits(fp32).abs().max()  # same seed: same values up to rounding
    assert 0 < rel.item() < 0.05


def test_factory_is_seeded_and_well_formed(tmp_path):
    cfg = affine_cfg()
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tok / name).write_text(json.dumps({"name": name}))
    a = make_checkpoint(tmp_path / "a", cfg, seed=7, tokenizer_dir=tok)
    b = make_checkpoint(tmp_path / "b", cfg, seed=7)
    c = make_checkpoint(tmp_path / "c", cfg, seed=8)
    s = make_checkpoint(tmp_path / "s", cfg, seed=7, shard_size_bytes=1 << 20)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    sa, sc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    _, ss = load_checkpoint(s)  # sharding does not change any value
    assert all(torch.equal(ss[k], sa[k].to(ss[k].dtype)) for k in sa)
    np.testing.assert_array_equal(sa["code.A"].numpy(), cfg.code.A)
    np.testing.assert_array_equal(sa["code.b"].numpy(), cfg.code.b)
    assert abs(sa["layers.0.attn.q_proj.weight"].std().item() - 0.5 / 8) < 0.005  # 0.5 / sqrt(64)
    assert abs(sa["layers.0.mlp.down_proj.weight"].std().item() - 0.5 / 16) < 0.003  # fan-in 256
    assert abs(sa["layers.1.ln2.weight"].mean().item() - 1) < 0.03
    assert json.loads((a / "tokenizer_config.json").read_text()) == {"name": "tokenizer_config.json"}
    assert not (b / "tokenizer.json").exists()
    gen = json.loads((a / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"], gen["max_length"]) == (57345, 57346, 57344, 128)
    # random models have clear winners: top-1 / top-2 gap well above float noise
    lg = logits(load_model(a)).reshape(-1, 65536)
    top = lg.topk(2, dim=-1).values
    gap = (top[:, 0] - top[:, 1]) / lg.abs().max(-1).values
    assert gap.median().item() > 0.01 and gap.min().item() > 1e-4
    assert not list(a.glob(".*.tmp"))


def test_factory_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "reference.factory", *a], cwd=ROOT, capture_output=True, text=True)
    h = run("--help")
    assert h.returncode == 0 and "--size" in h.stdout and "--dtype" in h.stdout
    r = run("--out", str(tmp_path / "cli"), "--size", "tiny", "--seed", "2", "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    model = load_model(tmp_path / "cli")
    assert model.cfg.hidden_size == 64 and not np.array_equal(model.cfg.code.A, np.eye(16))
    bad = run("--out", str(tmp_path / "x"), "--size", "huge")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# -- bad input (SPEC 6), each a one-line error naming the file and the fix -------------------------
@pytest.fixture()
def good(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "good", affine_cfg(), seed=0)


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(folder: Path, edit) -> None:
    t = load_file(folder / "model.safetensors")
    edit(t)
    save_file(t, folder / "model.safetensors")


def test_config_sizes_disagree_with_weights(good):
    edit_config(good, hidden_size=128)
    one_line_error(good, ["config.json", "hidden_size=128", "the weights say hidden_size=64", "fix config.json"])
    edit_config(good, hidden_size=64, intermediate_size=512)
    one_line_error(good, ["config.json", "intermediate_size=256", "fix config.json"])
    edit_config(good, intermediate_size=256, num_hidden_layers=3)
    one_line_error(good, ["config.json", "num_hidden_layers = 3", "2 layers", "fix config.json"])


def test_missing_tensor(good):
    rewrite_tensors(good, lambda t: t.pop("layers.1.mlp.down_proj.weight"))
    one_line_error(good, ["model.safetensors", "layers.1.mlp.down_proj.weight", "re-download or re-write"])


def test_wrong_dtype_or_values_for_A(good):
    rewrite_tensors(good, lambda t: t.update({"code.A": t["code.A"].float()}))
    one_line_error(good, ["model.safetensors", "code.A", "F32", "uint8"])
    rewrite_tensors(good, lambda t: t.update({"code.A": t["code.A"].to(torch.uint8) * 2}))
    one_line_error(good, ["model.safetensors", "code.A", "other than 0 and 1"])


def test_singular_A_in_weights(good):
    def make_singular(t):
        A = t["code.A"].clone()
        A[3] = A[0]
        t["code.A"] = A
    rewrite_tensors(good, make_singular)
    one_line_error(good, ["model.safetensors", "singular", "invertible A"])


def test_pickle_only_folder_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(affine_cfg().to_dict()))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    one_line_error(folder, ["pytorch_model.bin", "arbitrary code", "never unpickled", "safetensors"])
    assert not marker.exists()


def test_folder_code_is_never_run(good, tmp_path):
    marker = tmp_path / "imported"
    (good / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (good / "__init__.py").write_text(f"open({str(marker)!r}, 'w')\n")
    edit_config(good, auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    load_model(good)
    assert not marker.exists()


def test_missing_folder_config_and_truncated_file(tmp_path, good):
    one_line_error(tmp_path / "nowhere", ["nowhere", "does not exist"])
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[: len(data) - 1000])
    one_line_error(good, ["model.safetensors", "truncated", "re-download"])
    (good / "config.json").unlink()
    one_line_error(good, ["config.json", "missing"])


def test_headers_are_checked_before_data_is_read(good, monkeypatch):
    """A size mismatch must be found from the headers: no tensor data is read at all."""
    import reference.checkpoint as ck

    def no_reads(info):
        raise AssertionError(f"read {info.name} before validating")

    edit_config(good, vocab_size=60000)
    monkeypatch.setattr(ck, "read_tensor", no_reads)
    one_line_error(good, ["vocab_size=60000", "the weights say vocab_size=65536"])
    assert read_header(good / "model.safetensors")["lm_head.weight"].shape == (65536, 64)
