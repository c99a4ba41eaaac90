"""How long the --trust-remote-code search takes at a given shape, without building anything.

The folder's model is tests/remote_code_neox (an independently written GPT-NeoX-style model) with
random weights, made in memory; the reference shares its tensors (only the fused qkv is split,
a copy), so the run holds about one model's weights plus the qkv. Two cases:

- `found`: the code takes its bits msb first, RoPE on a quarter of each head with base 1e6, and a
  parallel residual, while the config says none of it: three search steps (the lift, the attention
  with the 2 x 3 x 4 pairing/rotary-dim/base product, the MLP input), the heaviest success path;
- `refused`: the same with a post-LN block: the attention-input step finds nothing in its own field,
  then tries every other block field alone before refusing (the longest refusal at layer 0).

Timed: capturing the folder's run (one forward with hooks) and `export.remote.search`. Not timed:
transformers loading the folder from disk and the build after it.

    python benchmarks/remote_search.py --size full      # V 65,536, d 1024, 32 layers, 32 heads
    python benchmarks/remote_search.py --size mid       # d 512, 8 layers
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {"full": dict(hidden_size=1024, num_hidden_layers=32, num_attention_heads=32, intermediate_size=4096),
         "mid": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048)}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reference_from(folder_model, cfg):
    """A TableFreeLM whose parameters are the folder model's tensors (qkv split per head: a copy)."""
    import torch

    from reference.model import TableFreeLM

    d, h = cfg.hidden_size, cfg.num_attention_heads
    hs = d // h
    sd = {"code.A": folder_model.gpt_neox.code_A, "code.b": folder_model.gpt_neox.code_b,
          "ln_f.weight": folder_model.gpt_neox.final_layer_norm.weight,
          "ln_f.bias": folder_model.gpt_neox.final_layer_norm.bias, "lm_head.weight": folder_model.embed_out.weight}
    for i, layer in enumerate(folder_model.gpt_neox.layers):
        p = f"layers.{i}"
        for ours, theirs in (("ln1", layer.input_layernorm), ("ln2", layer.post_attention_layernorm)):
            sd[f"{p}.{ours}.weight"], sd[f"{p}.{ours}.bias"] = theirs.weight, theirs.bias
        for part in ("weight", "bias"):
            t = getattr(layer.attention.query_key_value, part).detach()
            t = t.reshape(h, 3, hs, *t.shape[1:]).transpose(0, 1).reshape(3 * d, *t.shape[1:])
            for n, piece in zip("qkv", t.chunk(3)):
                sd[f"{p}.attn.{n}_proj.{part}"] = piece.contiguous()
            sd[f"{p}.attn.o_proj.{part}"] = getattr(layer.attention.dense, part)
            sd[f"{p}.mlp.up_proj.{part}"] = getattr(layer.mlp.dense_h_to_4h, part)
            sd[f"{p}.mlp.down_proj.{part}"] = getattr(layer.mlp.dense_4h_to_h, part)
    with torch.device("meta"):
        lm = TableFreeLM(cfg)
    lm.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=True, assign=True)
    return lm.eval()


def run(size: str, case: str) -> dict:
    import torch

    from export import remote, stages
    from reference.config import CodeConfig, ModelConfig
    from reference.lift import random_invertible_gf2
    from remote_code_neox.configuration_neoxcode import NeoxCodeConfig
    from remote_code_neox.modeling_neoxcode import NeoxCodeForCausalLM

    shape = SIZES[size]
    torch.manual_seed(0)
    conf = NeoxCodeConfig(vocab_size=65536, max_position_embeddings=1024, rotary_pct=0.25, rotary_emb_base=1e6,
                          use_parallel_residual=True, post_layernorm=case == "refused", **shape)
    folder_model = NeoxCodeForCausalLM(conf).eval()
    A, b = random_invertible_gf2(16, seed=0)
    folder_model.gpt_neox.code_A.copy_(torch.as_tensor(A))
    folder_model.gpt_neox.code_b.copy_(torch.as_tensor(b))
    # what the config adapter would read from a config.json that omits the code's defaults
    cfg = ModelConfig(vocab_size=65536, max_position_embeddings=1024, code=CodeConfig(bits=16, A=A, b=b), **shape)
    lm = reference_from(folder_model, cfg)
    ids = remote.probe_ids(cfg.vocab_size, cfg.max_position_embeddings)
    t0 = time.perf_counter()
    folder_run = stages.capture_folder(folder_model, ids, cfg.hidden_size, lambda m: remote.remote_logits(m, ids))
    t1 = time.perf_counter()
    conv, rep, tried, steps = remote.search(lm, folder_run, ids)
    t2 = time.perf_counter()
    return {"size": size, "case": case, "shape": shape, "agrees": rep.agrees, "combinations_tried": tried,
            "steps": [{"differs_at": s["differs_at"], "changed": s["changed"]} for s in steps],
            "final": rep.sentence(), "capture_s": round(t1 - t0, 2), "search_s": round(t2 - t1, 2),
            "peak_rss_mb": round(peak_rss_mb())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="mid")
    p.add_argument("--case", choices=("found", "refused"), default="found")
    args = p.parse_args()
    print(json.dumps(run(args.size, args.case), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
