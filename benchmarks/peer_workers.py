"""The peers' side of `make bench-peers` (benchmarks/peers.py): one worker per runtime, each run in a
fresh process of the venv that holds that runtime, printing one JSON line.

Why a file of its own: the peers live in venvs that conflict with the main one (llama-cpp-python,
OpenVINO and torch in .venvs/peers, onnxruntime-genai in .venvs/genai), so this module imports
nothing of the project at top level; each worker imports what its own venv has. Every worker
measures the protocol of benchmarks/bench.py's `ort` worker, so the rows compare:

- prefill: a warm-up on 8 tokens, then a 128-token prompt to its first token (TTFT; prefill tok/s
  is 128 / TTFT);
- decode at context C: a C-token prompt, 2 warm-up steps, then `--steps` greedy steps timed from
  the first token to the last (the steps alone);
- peak RSS: this process's VmHWM at the end.

    python benchmarks/peer_workers.py gguf --ckpt CKPT --out DIR     # .venvs/peers: write the GGUFs
    python benchmarks/peer_workers.py llama_check --gguf F --ckpt CKPT
    python benchmarks/peer_workers.py llama|openvino|genai|torch_compile --model M ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, THREADS, peak_rss_bytes  # noqa: E402  (stdlib only: every venv imports it)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# llama.cpp file types (llama.h's llama_ftype) by the names the table uses
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}
GGML_TYPE_F32 = 0


def prompt_ids(n: int, vocab: int = 65536, seed: int = 0) -> list[int]:
    """bench.py's `_prompt`: the same ids for every runner (numpy's seeded generator)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, min(vocab, 50000), size=n).tolist()


def measure(step_prompt, step_next, args: argparse.Namespace, vocab: int) -> dict:
    """The shared protocol. step_prompt(ids) -> first token after a fresh prompt (cache reset);
    step_next(tok) -> the next greedy token, the cache grown by one."""
    out: dict = {}
    for n in args.prefill:
        ids = prompt_ids(n, vocab)
        step_prompt(ids[:8])  # warm-up
        t0 = time.perf_counter()
        step_prompt(ids)
        dt = time.perf_counter() - t0
        out[f"prefill_{n}_tok_s"], out[f"ttft_{n}_s"] = n / dt, dt
    for ctx in args.contexts:
        tok = step_prompt(prompt_ids(ctx, vocab))
        for _ in range(2):  # warm-up at this context
            tok = step_next(tok)
        seen = []
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tok = step_next(tok)
            seen.append(tok)
        out[f"decode_{ctx}_tok_s"] = args.steps / (time.perf_counter() - t0)
        out[f"greedy_{ctx}_ids"] = seen[:8]  # steps 3-10 after the prompt: compared across runners
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


# -- llama.cpp ------------------------------------------------------------------------------------

def worker_gguf(args: argparse.Namespace) -> dict:
    """The checkpoint as GGUF (GPT-NeoX architecture, sequential residual), then its quantized copies.

    llama.cpp has no table-free input, so token_embd is the code materialised for every id with
    reference/'s own lift (exact: the code is fixed). GPT-NeoX is the llama.cpp block that computes
    this model: LayerNorm with bias, q/k/v fused into attn_qkv with bias (rows q, k, v), rotate-half
    RoPE over the whole head, a GELU MLP with biases, an untied head without bias. The one op it
    computes differently is the GELU: llama.cpp's is the tanh form through a float16 table, ours the
    erf form (the logits check measures what that costs)."""
    import gguf
    import llama_cpp
    import numpy as np
    import torch

    from reference.checkpoint import load_model

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / "model-F32.gguf"
    info: dict = {}
    if not f32.is_file():
        model = load_model(Path(args.ckpt))
        cfg = model.cfg
        assert cfg.norm_type == "layernorm" and cfg.norm_bias and cfg.attention_bias and cfg.mlp_bias
        assert not cfg.parallel_residual and cfg.rope_pairing == "rotate_half" and not cfg.input_table
        sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
        with torch.inference_mode():
            table = model.embed(torch.arange(cfg.vocab_size)).numpy()  # [V, d]: the lift of every id
        tmp = f32.with_name(f32.name + ".tmp")
        w = gguf.GGUFWriter(str(tmp), arch="gptneox")
        w.add_name("tablefree-full (code materialised as token_embd)")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(cfg.rope_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_attention_heads)
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_bool("gptneox.use_parallel_residual", False)
        w.add_file_type(0)  # ALL_F32
        w.add_tokenizer_model("none")  # ids in, ids out: llama.cpp adds V dummy tokens
        w.add_vocab_size(cfg.vocab_size)
        w.add_tensor("token_embd.weight", np.ascontiguousarray(table))
        w.add_tensor("output_norm.weight", sd["ln_f.weight"])
        w.add_tensor("output_norm.bias", sd["ln_f.bias"])
        w.add_tensor("output.weight", sd["lm_head.weight"])
        for i in range(cfg.num_hidden_layers):
            p, b = f"layers.{i}.", f"blk.{i}."
            w.add_tensor(b + "attn_norm.weight", sd[p + "ln1.weight"])
            w.add_tensor(b + "attn_norm.bias", sd[p + "ln1.bias"])
            w.add_tensor(b + "attn_qkv.weight", np.concatenate([sd[p + f"attn.{n}_proj.weight"] for n in "qkv"]))
            w.add_tensor(b + "attn_qkv.bias", np.concatenate([sd[p + f"attn.{n}_proj.bias"] for n in "qkv"]))
            w.add_tensor(b + "attn_output.weight", sd[p + "attn.o_proj.weight"])
            w.add_tensor(b + "attn_output.bias", sd[p + "attn.o_proj.bias"])
            w.add_tensor(b + "ffn_norm.weight", sd[p + "ln2.weight"])
            w.add_tensor(b + "ffn_norm.bias", sd[p + "ln2.bias"])
            w.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
            w.add_tensor(b + "ffn_up.bias", sd[p + "mlp.up_proj.bias"])
            w.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
            w.add_tensor(b + "ffn_down.bias", sd[p + "mlp.down_proj.bias"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        del sd, table, model
        os.replace(tmp, f32)
    info["F32"] = {"path": str(f32), "bytes": f32.stat().st_size}
    for name in args.quants:
        dst = out_dir / f"model-{name}.gguf"
        if not dst.is_file():
            t0 = time.perf_counter()
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = LLAMA_FTYPES[name]
            params.nthread = THREADS
            tmp = dst.with_name(dst.name + ".tmp")
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise SystemExit(f"llama_model_quantize {name} failed ({rc}); see its log above")
            os.replace(tmp, dst)
            info.setdefault("quantize_s", {})[name] = time.perf_counter() - t0
        info[name] = {"path": str(dst), "bytes": dst.stat().st_size}
    return info


def _llama(path: str, logits_all: bool = False, f32_cache: bool = False):
    from llama_cpp import Llama

    kw = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    return Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=THREADS, n_threads_batch=THREADS,
                 logits_all=logits_all, verbose=False, **kw)


def _reference_logits(ckpt: str, ids: list[int]):
    import torch

    from reference.checkpoint import load_model

    with torch.inference_mode():
        return load_model(Path(ckpt))(torch.tensor([ids]))[0][0].numpy()


def logits_vs_reference(got, ref) -> dict:
    """[S, V] logits against the reference's: max/mean |diff|, top-1 agreement, mean KL(ref || got)."""
    import numpy as np

    d = np.abs(got - ref)
    lp_r = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lp_g = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = (np.exp(lp_r) * (lp_r - lp_g)).sum(-1)
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "ref_logit_std": float(ref.std()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()), "mean_kl": float(kl.mean())}


def worker_llama_check(args: argparse.Namespace) -> dict:
    """llama.cpp's logits for every position of a prompt against the PyTorch reference's, with a
    float32 and with llama.cpp's default float16 KV cache."""
    import numpy as np

    ids = prompt_ids(args.check_len)
    ref = _reference_logits(args.ckpt, ids)
    out: dict = {"prompt_len": len(ids)}
    for f32_cache in (True, False):
        llm = _llama(args.model, logits_all=True, f32_cache=f32_cache)
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        out["f32_cache" if f32_cache else "f16_cache"] = logits_vs_reference(got, ref)
        del llm
    return out


def worker_ours_check(args: argparse.Namespace) -> dict:
    """The runtime's logits (model.onnx through Model.forward) on the llama check's prompt, same metrics."""
    import numpy as np

    import runtime

    ids = prompt_ids(args.check_len)
    ref = _reference_logits(args.ckpt, ids)
    model = runtime.load(args.model, provider="cpu", threads=THREADS, graph="spec")
    got = np.asarray(model.forward(np.array([ids], np.int64)).logits[0], dtype=np.float32)
    return {"prompt_len": len(ids), **logits_vs_reference(got, ref)}


def worker_llama(args: argparse.Namespace) -> dict:
    """llama.cpp through llama-cpp-python's Llama.eval: the cache is llama.cpp's default (float16)
    unless --f32-cache; logits of the last position only, as an app generating text asks."""
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = _llama(args.model, f32_cache=args.f32_cache)
    out = {"load_s": time.perf_counter() - t0, "version": llama_cpp.__version__,
           "cache": "f32" if args.f32_cache else "f16"}

    V = llm.n_vocab()

    def last_argmax() -> int:
        # Llama.eval keeps no scores without logits_all: read the last row as llama.cpp's samplers do
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(V,))))

    def step_prompt(ids: list[int]) -> int:
        llm.reset()
        llm.eval(ids)
        return last_argmax()

    def step_next(tok: int) -> int:
        llm.eval([tok])
        return last_argmax()

    return {**out, **measure(step_prompt, step_next, args, V)}


# -- OpenVINO -------------------------------------------------------------------------------------

def worker_openvino(args: argparse.Namespace) -> dict:
    """OpenVINO's CPU plugin on the artifact's model.onnx, float32 inference precision (its default
    on a CPU with bf16 would be bfloat16) unless --ov-precision says otherwise. The cache is kept
    inside OpenVINO as state (the make-stateful pass optimum-intel applies to its own exports), so
    no cache crosses into Python between steps."""
    import numpy as np
    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    core = ov.Core()
    t0 = time.perf_counter()
    model = core.read_model(str(Path(args.model) / "model.onnx"))
    names = [i.get_any_name() for i in model.inputs]
    pairs = {n: n.replace("past_key_values", "present") for n in names if n.startswith("past_key_values")}
    # batch 1, so the state's initial value (an empty cache) has batch 1 rather than 0
    model.reshape({i.get_any_name(): ov.PartialShape([1 if j == 0 else d for j, d in enumerate(i.get_partial_shape())])
                   for i in model.inputs})
    apply_make_stateful_transformation(model, pairs)
    cfg = {"INFERENCE_NUM_THREADS": THREADS, "INFERENCE_PRECISION_HINT": args.ov_precision,
           "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    compiled = core.compile_model(model, "CPU", cfg)
    req = compiled.create_infer_request()
    out = {"load_s": time.perf_counter() - t0, "version": ov.get_version(), "precision": args.ov_precision}
    for prop in ("KV_CACHE_PRECISION", "INFERENCE_PRECISION_HINT", "DYNAMIC_QUANTIZATION_GROUP_SIZE"):
        try:  # what the plugin chose (a fused stateful attention may keep its cache in 8 bits)
            out[prop.lower()] = str(compiled.get_property(prop))
        except RuntimeError:
            pass
    kinds = {str(op.get_rt_info()["layerType"].astype(str)) for op in compiled.get_runtime_model().get_ops()}
    # whether the plugin fused attention (its SDPA node, where a u8 KV_CACHE_PRECISION applies) or runs
    # this graph's MatMul + Softmax over a Concat-grown float32 state
    out["fused_attention"] = sorted(k for k in kinds if "attn" in k.lower() or "sdpa" in k.lower())
    state = {"len": 0}

    def run(ids: list[int]) -> int:
        p, s = state["len"], len(ids)
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, p + s), np.int64),
                "position_ids": np.arange(p, p + s, dtype=np.int64)[None]}
        res = req.infer(feed)
        state["len"] = p + s
        return int(np.argmax(res[compiled.output("logits")][0, -1]))

    def step_prompt(ids: list[int]) -> int:
        req.reset_state()
        state["len"] = 0
        return run(ids)

    return {**out, **measure(step_prompt, lambda t: run([t]), args, 65536)}


# -- onnxruntime-genai ----------------------------------------------------------------------------

def worker_genai(args: argparse.Namespace) -> dict:
    """onnxruntime-genai on the artifact as it ships (genai_config.json, model.genai.onnx, shared
    cache buffer), greedy."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    cfg = og.Config(str(args.model))
    model = og.Model(cfg)
    out = {"load_s": time.perf_counter() - t0, "version": og.__version__}
    holder: dict = {}

    def step_prompt(ids: list[int]) -> int:
        holder.pop("gen", None)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + args.steps + 8)
        gen = og.Generator(model, params)
        holder["gen"] = gen
        gen.append_tokens(ids)
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])

    def step_next(tok: int) -> int:
        gen = holder["gen"]
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])

    return {**out, **measure(step_prompt, step_next, args, 65536)}


# -- torch.compile --------------------------------------------------------------------------------

def worker_torch_compile(args: argparse.Namespace) -> dict:
    """The PyTorch reference under torch.compile (inductor, dynamic shapes so the growing cache does
    not recompile every step), float32. Compilation is paid in the warm-ups and reported as load_s."""
    import torch

    from reference.checkpoint import load_model

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model = load_model(Path(args.model))
    fn = torch.compile(model, dynamic=True)
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids(16)])
        logits, past = fn(ids)  # compile the prompt graph
        for _ in range(2):  # and the step graph: the second step's cache has other strides (a recompile)
            logits, past = fn(logits[:, -1:].argmax(-1), past_key_values=past)
    out = {"load_s": time.perf_counter() - t0, "version": torch.__version__}
    holder: dict = {}

    def step_prompt(ids: list[int]) -> int:
        logits, holder["past"] = fn(torch.tensor([ids]))
        return int(logits[0, -1].argmax())

    def step_next(tok: int) -> int:
        logits, holder["past"] = fn(torch.tensor([[tok]]), past_key_values=holder["past"])
        return int(logits[0, -1].argmax())

    with torch.inference_mode():
        return {**out, **measure(step_prompt, step_next, args, model.cfg.vocab_size)}


WORKERS = {"gguf": worker_gguf, "llama_check": worker_llama_check, "ours_check": worker_ours_check, "llama": worker_llama,
           "openvino": worker_openvino, "genai": worker_genai, "torch_compile": worker_torch_compile}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("worker", choices=tuple(WORKERS))
    p.add_argument("--model", help="a GGUF file (llama), an artifact folder (openvino, genai) or a checkpoint (torch)")
    p.add_argument("--ckpt", help="the full-size checkpoint (gguf, llama_check)")
    p.add_argument("--out", help="folder of the GGUF files (gguf)")
    p.add_argument("--quants", nargs="*", default=["Q8_0", "Q4_0"], choices=tuple(LLAMA_FTYPES))
    p.add_argument("--contexts", nargs="+", type=int, default=[128, 900])
    p.add_argument("--prefill", nargs="+", type=int, default=[128])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--check-len", type=int, default=64)
    p.add_argument("--f32-cache", action="store_true", help="llama: float32 KV cache instead of llama.cpp's float16")
    p.add_argument("--ov-precision", default="f32", choices=("f32", "bf16"))
    args = p.parse_args(argv)
    print(json.dumps(WORKERS[args.worker](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
