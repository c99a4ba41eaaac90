"""A partial-rotary checkpoint on the fast path (issue 21 item 1): the default build ships model.kv.onnx.

The oracle is tests/remote_code_partial_rotary/: a Llama-named decoder written apart from
reference/ (its bit order in its code only, rotate-half RoPE on the first half of each head as
config.json's `partial_rotary_factor` says, exact GELU, a key/value cache of its own). The build
runs with --trust-remote-code and nothing else; the kv graph (RoPE on 8 of 16 features per head
in RotaryEmbedding nodes before GroupQueryAttention, graphs/rotary.py) passes the gate, and the
runtime's greedy tokens on it equal `generate()` of transformers running the folder's code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from export.build import build  # noqa: E402
from runtime.interface import KV_MODEL_FILE  # noqa: E402
from test_remote_code import folder_model  # noqa: E402  (transformers running the folder's code)

CODE_DIR = Path(__file__).parent / "remote_code_partial_rotary"
D, LAYERS, HEADS, FF, V = 64, 2, 4, 256, 65536
HS = D // HEADS  # 16 features per head, RoPE on the first 8


def make_folder(folder: Path, tokenizer_dir: Path) -> Path:
    """The checkpoint as its author would publish it: own code, Llama tensor names, no lift conventions in config.json."""
    from safetensors.torch import save_file

    from reference.lift import random_invertible_gf2

    folder.mkdir(parents=True)
    for f in CODE_DIR.glob("*.py"):
        shutil.copy(f, folder / f.name)
    config = {"model_type": "half_rope_code_test", "architectures": ["HalfRopeForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_halfrope.HalfRopeConfig",
                           "AutoModelForCausalLM": "modeling_halfrope.HalfRopeForCausalLM"},
              "vocab_size": V, "hidden_size": D, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "intermediate_size": FF, "max_position_embeddings": 128, "partial_rotary_factor": 0.5,
              "rope_theta": 10000.0, "layer_norm_eps": 1e-5,
              "bos_token_id": 57345, "eos_token_id": 57346, "pad_token_id": 57344}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(17)

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    A, b = random_invertible_gf2(16, seed=21)
    sd = {"model.lift.A": torch.as_tensor(A, dtype=torch.uint8), "model.lift.b": torch.as_tensor(b, dtype=torch.uint8),
          "model.norm.weight": 1 + w(D), "model.norm.bias": w(D), "lm_head.weight": w(V, D, std=0.5)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + w(D), p + "post_attention_layernorm.weight": 1 + w(D),
                   p + "input_layernorm.bias": w(D), p + "post_attention_layernorm.bias": w(D),
                   **{p + f"self_attn.{n}_proj.weight": w(D, D, std=0.3) for n in "qkv"},
                   p + "self_attn.o_proj.weight": w(D, D),
                   p + "mlp.up_proj.weight": w(FF, D, std=0.2), p + "mlp.up_proj.bias": w(FF),
                   p + "mlp.down_proj.weight": w(D, FF), p + "mlp.down_proj.bias": w(D)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bvv241_dir) -> tuple[Path, Path]:
    folder = make_folder(tmp_path_factory.mktemp("halfrope") / "ckpt", bvv241_dir)
    out = build(folder, tmp_path_factory.mktemp("halfrope_out") / "art", lift_mode="arith", trust_remote_code=True,
                log=lambda m: None)  # the default build: no --no-kv-graph, no convention flags
    return folder, out


def test_default_build_ships_the_kv_graph_and_it_passes_the_gate(exported):
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["source"]["remote_code"]
    assert {k: v["now"] for k, v in check["changed"].items()} == {"bit_order": "msb_first"}  # found by the search
    config = json.loads((out / "config.json").read_text())
    assert config["rotary_dim"] == HS // 2 and config["rope_pairing"] == "rotate_half"  # from partial_rotary_factor
    assert manifest["kv_graph"]["file"] == KV_MODEL_FILE and (out / KV_MODEL_FILE).is_file()
    assert manifest["kv_graph"]["rotary"].startswith("com.microsoft.RotaryEmbedding")
    parity = manifest["parity"]
    rows = {c["name"]: c for c in parity["checks"]}
    assert parity["passed"] and rows["kv graph: greedy tokens equal"]["passed"]
    assert rows["kv graph: right-padded batch == solo rows"]["passed"]
    assert rows["genai graph: teacher-forced max|diff|"]["passed"]
    # RoPE on 8 of 16 features in front of an attention op that only attends
    g = onnx.load(str(out / KV_MODEL_FILE), load_external_data=False).graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    rot = [n for n in g.node if n.op_type == "RotaryEmbedding"]
    assert len(gqa) == LAYERS and len(rot) == 2 * LAYERS
    assert all({a.name: a.i for a in n.attribute}.get("do_rotary", 0) == 0 for n in gqa)
    assert all({a.name: a.i for a in n.attribute}["rotary_embedding_dim"] == HS // 2 for n in rot)


def test_runtime_greedy_tokens_equal_generate_of_the_folders_code(exported):
    """runtime.generate (on model.kv.onnx) against transformers' generate() on the folder's own model,
    one prompt and a right-padded batch of two; and the prompt logits within the fp32 bound."""
    import runtime

    folder, out = exported
    oracle = folder_model(folder)
    model = runtime.load(out, provider="cpu")
    assert model.kv_session is not None  # generation runs on the shared-cache graph
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(0, V, n)] for n in (7, 12)]
    with torch.no_grad():
        want_logits = oracle(input_ids=torch.tensor([prompts[1]])).logits.numpy()
    got_logits = model.forward(np.asarray([prompts[1]], np.int64)).logits
    assert np.abs(got_logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    want = []
    for p in prompts:
        with torch.no_grad():
            ids = oracle.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=57344)
        want.append(ids[0, len(p):].tolist())
    assert model.generate(prompts[0], max_new_tokens=24).ids == want[0]
    assert [r.ids for r in model.generate(prompts, max_new_tokens=24)] == want
