"""Long-context decode probe (issue 20.3): what bounds decode@900 / decode@128 on model.kv.onnx, and
which cache ONNX Runtime's CPU GroupQueryAttention reads fastest.

Why not bench.py: the question is a kernel's, so the variants run in one process, interleaved,
decoding from a cache whose length is set directly (attention's cost does not depend on the cache's
values), so no prompt enters the figure. Each variant graph is written to --out beside a hard link
to the artifact's model.onnx.data (the artifact folder is only read). Variants:

- fp32:        the shipped graph (float32 cache)
- nospin:      the same, `session.intra_op.allow_spinning=0`
- t1:          the same, 1 intra-op thread
- noflash:     the same, ORT_GQA_DISABLE_FLASH_ATTENTION=1 (ORT 1.32's naive GEMM + softmax path)
- int8t/int8c: int8 cache (GQA `kv_cache_bit_width=8`, `k/v_quant_type` PER_TENSOR / PER_CHANNEL,
               scales calibrated on a random-token prompt through the fp32 graph, x1.25 margin)
- fp16:        float16 cache with float32 q/k/v (T_CACHE float16; no Cast nodes)

`profile` sums ORT's per-node profile of decode steps by op type; `quality` samples a text from the
fp32-cache graph and teacher-forces it through each variant (top-1, KL against the fp32 cache).

    python benchmarks/longctx_probe.py time --artifact DIR [--variants ...] [--rounds 3]
    python benchmarks/longctx_probe.py paired --artifact DIR --variants fp32 int8c --rounds 15 --steps 8
    python benchmarks/longctx_probe.py attn --artifact DIR --variants fp32 int8t int8c fp16 --rounds 10 --steps 10
    python benchmarks/longctx_probe.py profile --artifact DIR
    python benchmarks/longctx_probe.py quality --artifact DIR --length 900
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime import interface as I  # noqa: E402

OUT = Path(os.environ.get("LONGCTX_OUT", "/tmp/longctx-artifacts"))
QUANT = {"int8t": ("PER_TENSOR", TensorProto.INT8), "int8c": ("PER_CHANNEL", TensorProto.INT8)}
CACHE_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT8: np.int8}


def cpu_sample() -> tuple[int, int, float]:
    """(busy jiffies, all jiffies, this process's CPU seconds): other processes' share between two samples."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = f[3] + f[4]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return sum(f) - idle, sum(f), ru.ru_utime + ru.ru_stime


def other_share(a, b) -> float:
    hz = os.sysconf("SC_CLK_TCK")
    busy, total = b[0] - a[0], b[1] - a[1]
    return max(0.0, (busy - (b[2] - a[2]) * hz) / max(total, 1))


def dims(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    H = int(cfg["num_attention_heads"])
    return dict(L=int(cfg["num_hidden_layers"]), H=H, hs=int(cfg["hidden_size"]) // H,
                V=int(cfg["vocab_size"]), max_len=int(cfg["max_position_embeddings"]))


def options(threads: int = 2, spin: bool = True, profile: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()  # as runtime/sessions.py, threads pinned for comparable rows
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    return so


class Decoder:
    """A model.kv.onnx session with its shared cache bound once (as runtime.cache.SharedBufferCache)."""

    def __init__(self, path: Path, d: dict, so: ort.SessionOptions):
        self.s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        t = {i.name: i.type for i in self.s.get_inputs()}[I.PAST_KEY.format(i=0)]
        self.dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}[t]
        self.b = b = self.s.io_binding()
        self.logits = np.empty((1, 1, d["V"]), np.float32)
        b.bind_output(I.LOGITS, "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        self.host = [np.zeros((1, d["H"], d["max_len"], d["hs"]), self.dtype) for _ in range(2 * d["L"])]
        self.bufs = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.host]
        for p, q, v in zip(I.past_names(d["L"]), I.present_names(d["L"]), self.bufs):
            b.bind_ortvalue_input(p, v)
            b.bind_ortvalue_output(q, v)
        self.tok, self.sk, self.tot = np.zeros((1, 1), np.int64), np.zeros(1, np.int32), np.zeros((), np.int32)
        for n, a in ((I.INPUT_IDS, self.tok), (I.SEQLENS_K, self.sk), (I.TOTAL_SEQUENCE_LENGTH, self.tot)):
            b.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(a))
        self.keep = np.ones(1, np.int64)
        if I.LOGITS_TO_KEEP in {i.name for i in self.s.get_inputs()}:
            b.bind_ortvalue_input(I.LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(self.keep))
        self.pos = 0

    def step(self, token: int) -> np.ndarray:
        """Append `token` at position self.pos; its next-token logits [V] (a view overwritten next step)."""
        self.tok[0, 0], self.sk[0], self.tot[()] = token, self.pos, self.pos + 1
        self.s.run_with_iobinding(self.b)
        self.pos += 1
        return self.logits[0, 0]


def calibrate(folder: Path, d: dict, n: int = 256, seed: int = 1) -> list[np.ndarray]:
    """Per-layer |K|, |V| maxima per channel [H*hs] (head-major) over a random-token prompt, by decode steps."""
    dec = Decoder(folder / "model.kv.onnx", d, options())
    ids = np.random.default_rng(seed).integers(0, d["V"] - 8, n)
    for t in ids:
        dec.step(int(t))
    return [np.abs(a[0, :, :n, :]).max(axis=1).reshape(-1) for a in dec.host]


def variant(folder: Path, name: str, d: dict) -> Path:
    """The graph of variant `name` in OUT/<artifact>-<name>/model.kv.onnx (built once)."""
    if name in ("fp32", "nospin", "t1", "noflash"):
        return folder / "model.kv.onnx"
    out = OUT / f"{folder.name}-{name}"
    path = out / "model.kv.onnx"
    if path.exists():
        return path
    out.mkdir(parents=True, exist_ok=True)
    link = out / "model.onnx.data"  # a hard link: ORT refuses a data file outside the model's folder
    if not link.exists():
        os.link((folder / "model.onnx.data").resolve(), link)
    m = onnx.load(str(folder / "model.kv.onnx"), load_external_data=False)
    g = m.graph
    if name == "fp16":
        ctype = TensorProto.FLOAT16
    else:
        qtype, ctype = QUANT[name]
        maxima = calibrate(folder, d)
    layer = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        if name != "fp16":
            ks, vs = maxima[2 * layer] * 1.25 / 127, maxima[2 * layer + 1] * 1.25 / 127
            if qtype == "PER_TENSOR":
                ks, vs = np.array([ks.max()]), np.array([vs.max()])
            kn, vn = f"/model/gqa/k_scale.{layer}", f"/model/gqa/v_scale.{layer}"
            g.initializer.extend([numpy_helper.from_array(np.maximum(ks, 1e-8).astype(np.float32), kn),
                                  numpy_helper.from_array(np.maximum(vs, 1e-8).astype(np.float32), vn)])
            ins = list(node.input) + [""] * (12 - len(node.input)) + [kn, vn]
            del node.input[:]
            node.input.extend(ins)
            node.attribute.extend([helper.make_attribute("kv_cache_bit_width", 8),
                                   helper.make_attribute("k_quant_type", qtype),
                                   helper.make_attribute("v_quant_type", qtype)])
        layer += 1
    for vi in list(g.input) + list(g.output):
        if vi.name.startswith(("past_key_values.", "present.")):
            vi.type.tensor_type.elem_type = ctype
    tmp = path.with_suffix(".tmp")
    onnx.save(m, str(tmp))
    tmp.rename(path)
    return path


def session_for(folder: Path, name: str, d: dict, profile: str | None = None) -> Decoder:
    if name == "noflash":
        os.environ["ORT_GQA_DISABLE_FLASH_ATTENTION"] = "1"
    try:
        return Decoder(variant(folder, name, d), d, options(threads=1 if name == "t1" else 2,
                                                             spin=name != "nospin", profile=profile))
    finally:
        os.environ.pop("ORT_GQA_DISABLE_FLASH_ATTENTION", None)


def time_ctx(dec: Decoder, ctx: int, steps: int) -> float:
    """tok/s of `steps` decode steps from cache length ctx (3 warm-up steps first)."""
    dec.pos = ctx - 3
    for _ in range(3):
        dec.step(7)
    t = time.perf_counter()
    for _ in range(steps):
        dec.step(7)
    return steps / (time.perf_counter() - t)


def cmd_time(a) -> dict:
    folder = Path(a.artifact)
    d = dims(folder)
    for v in a.variants:
        variant(folder, v, d)
    rows = {v: {"128": [], "900": [], "other_cpu": []} for v in a.variants}
    for r in range(a.rounds):
        for v in a.variants:
            dec = session_for(folder, v, d)
            c0 = cpu_sample()
            for ctx in (128, 900):
                rows[v][str(ctx)].append(time_ctx(dec, ctx, a.steps))
            rows[v]["other_cpu"].append(other_share(c0, cpu_sample()))
            del dec
            print(f"round {r + 1} {v}: @128 {rows[v]['128'][-1]:.1f} @900 {rows[v]['900'][-1]:.1f} tok/s "
                  f"(other processes {rows[v]['other_cpu'][-1]:.0%})", flush=True)
    print(f"\n{folder.name}: | variant | decode@128 tok/s | decode@900 tok/s | ratio | other CPU |")
    for v, x in rows.items():
        m1, m9 = float(np.median(x["128"])), float(np.median(x["900"]))
        x.update(median_128=m1, median_900=m9, ratio=m9 / m1)
        print(f"| {v} | {m1:.1f} | {m9:.1f} | {m9 / m1:.2f} | {max(x['other_cpu']):.0%} |")
    return rows


def cmd_paired(a) -> dict:
    """All variants' sessions open at once, alternated in short blocks (a.steps steps per context), so
    the host's drift (bandwidth, neighbours) hits every variant alike; per-block ratios to the first."""
    folder = Path(a.artifact)
    d = dims(folder)
    decs = {v: session_for(folder, v, d) for v in a.variants}
    t = {v: {"128": [], "900": []} for v in a.variants}
    c0 = cpu_sample()
    names = list(decs)
    for r in range(a.rounds):  # the order rotates: no variant always follows the same one
        for v in names[r % len(names):] + names[:r % len(names)]:
            for ctx in ("900", "128"):
                t[v][ctx].append(time_ctx(decs[v], int(ctx), a.steps))
    other = other_share(c0, cpu_sample())
    base = a.variants[0]
    out = {"other_cpu": other, "blocks": a.rounds}
    print(f"\n{folder.name} paired, {a.rounds} blocks of {a.steps} steps, other processes {other:.0%}:")
    print(f"| variant | decode@128 tok/s | decode@900 tok/s | ratio 900/128 | @128 vs {base} | @900 vs {base} |")
    for v in a.variants:
        x = {c: np.array(t[v][c]) for c in t[v]}
        r1 = float(np.median(x["128"] / np.array(t[base]["128"])))
        r9 = float(np.median(x["900"] / np.array(t[base]["900"])))
        m1, m9 = float(np.median(x["128"])), float(np.median(x["900"]))
        out[v] = dict(median_128=m1, median_900=m9, ratio=float(np.median(x["900"] / x["128"])), vs_base_128=r1,
                      vs_base_900=r9, raw=t[v])
        print(f"| {v} | {m1:.1f} | {m9:.1f} | {out[v]['ratio']:.2f} | {r1:.2f}x | {r9:.2f}x |", flush=True)
    return out


def attn_graph(d: dict, ctype: int, qtype: str | None) -> bytes:
    """Attention alone: d["L"] GroupQueryAttention nodes in a chain (each its own [1,H,max_len,hs]
    cache, as the model's layers), so the kernel's time per step is measured without the weights."""
    H, hs, L = d["H"], d["hs"], d["max_len"]
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info(n, f, [1, 1, H * hs]) for n in ("q", "k", "v")]
    ins += [helper.make_tensor_value_info(I.SEQLENS_K, TensorProto.INT32, [1]),
            helper.make_tensor_value_info(I.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])]
    nodes, outs, inits, x = [], [], [], "q"
    for i in range(d["L"]):
        pk, pv, ok, ov = I.PAST_KEY.format(i=i), I.PAST_VALUE.format(i=i), I.PRESENT_KEY.format(i=i), I.PRESENT_VALUE.format(i=i)
        ins += [helper.make_tensor_value_info(n, ctype, [1, H, L, hs]) for n in (pk, pv)]
        names, attrs = [x, "k", "v", pk, pv, I.SEQLENS_K, I.TOTAL_SEQUENCE_LENGTH], {}
        if qtype:
            names += [""] * 5 + ["ks", "vs"]
            attrs = dict(kv_cache_bit_width=8, k_quant_type=qtype, v_quant_type=qtype)
        nodes.append(helper.make_node("GroupQueryAttention", names, [f"y{i}", ok, ov], domain="com.microsoft",
                                      num_heads=H, kv_num_heads=H, **attrs))
        outs += [helper.make_tensor_value_info(n, ctype, None) for n in (ok, ov)]
        x = f"y{i}"
    if qtype:
        n = 1 if qtype == "PER_TENSOR" else H * hs
        inits = [numpy_helper.from_array(np.full(n, 0.02, np.float32), nm) for nm in ("ks", "vs")]
    outs.insert(0, helper.make_tensor_value_info(I.LOGITS, f, None))
    nodes.append(helper.make_node("Identity", [x], [I.LOGITS]))
    g = helper.make_graph(nodes, "attn", ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def cmd_attn(a) -> dict:
    """Attention-only decode steps, cache variants alternated in blocks: ms/step and cache GB/s."""
    folder = Path(a.artifact)
    d = dims(folder)
    kinds = {"fp32": (TensorProto.FLOAT, None), "fp16": (TensorProto.FLOAT16, None),
             "int8t": (TensorProto.INT8, "PER_TENSOR"), "int8c": (TensorProto.INT8, "PER_CHANNEL")}
    rng = np.random.default_rng(0)
    runs = {}
    for v in a.variants:
        ctype, qtype = kinds[v]
        s = ort.InferenceSession(attn_graph(d, ctype, qtype), options(), providers=["CPUExecutionProvider"])
        b = s.io_binding()
        npd = CACHE_NP[ctype]
        host = [(rng.integers(-100, 100, (1, d["H"], d["max_len"], d["hs"])) if npd == np.int8 else
                 rng.standard_normal((1, d["H"], d["max_len"], d["hs"])) * 0.5).astype(npd) for _ in range(2 * d["L"])]
        vals = [ort.OrtValue.ortvalue_from_numpy(h) for h in host]
        for p, q, o in zip(I.past_names(d["L"]), I.present_names(d["L"]), vals):
            b.bind_ortvalue_input(p, o)
            b.bind_ortvalue_output(q, o)
        qkv = [(rng.standard_normal((1, 1, d["H"] * d["hs"])) * 0.5).astype(np.float32) for _ in range(3)]
        for n, x in zip("qkv", qkv):
            b.bind_cpu_input(n, x)
        sk, tot = np.zeros(1, np.int32), np.zeros((), np.int32)
        b.bind_ortvalue_input(I.SEQLENS_K, ort.OrtValue.ortvalue_from_numpy(sk))
        b.bind_ortvalue_input(I.TOTAL_SEQUENCE_LENGTH, ort.OrtValue.ortvalue_from_numpy(tot))
        b.bind_output(I.LOGITS, "cpu")
        runs[v] = (s, b, sk, tot, host, vals, qkv)
    t = {v: {"128": [], "900": []} for v in a.variants}
    c0 = cpu_sample()
    for _ in range(a.rounds):
        for v, (s, b, sk, tot, *_rest) in runs.items():
            for ctx in ("900", "128"):
                sk[0], tot[()] = int(ctx), int(ctx) + 1
                s.run_with_iobinding(b)
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    s.run_with_iobinding(b)
                t[v][ctx].append((time.perf_counter() - t0) / a.steps * 1e3)
    other = other_share(c0, cpu_sample())
    out = {"other_cpu": other}
    print(f"\nattention only ({d['L']} GQA nodes, H {d['H']}, head {d['hs']}), other processes {other:.0%}:")
    print("| cache | ms/step @128 | ms/step @900 | cache MB @900 | GB/s on the 900-128 extra bytes |")
    for v in a.variants:
        m1, m9 = float(np.median(t[v]["128"])), float(np.median(t[v]["900"]))
        per_pos = 2 * d["L"] * d["H"] * d["hs"] * np.dtype(CACHE_NP[kinds[v][0]]).itemsize
        gbs = per_pos * (900 - 128) / 1e9 / max((m9 - m1) / 1e3, 1e-9)
        out[v] = dict(ms_128=m1, ms_900=m9, cache_mb_900=per_pos * 900 / 1e6, gbps_extra=gbs, raw=t[v])
        print(f"| {v} | {m1:.2f} | {m9:.2f} | {per_pos * 900 / 1e6:.0f} | {gbs:.1f} |", flush=True)
    return out


def cmd_profile(a) -> dict:
    folder = Path(a.artifact)
    d = dims(folder)
    out = {}
    for ctx in (128, 900):
        prefix = f"/tmp/longctx_prof_{folder.name}_{ctx}"
        dec = session_for(folder, a.variants[0], d, profile=prefix)
        time_ctx(dec, ctx, a.steps)
        fn = dec.s.end_profiling()
        ev = json.load(open(fn))
        runs = [e for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"]
        nodes = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        by: dict[str, float] = {}
        for e in nodes:
            by[e["args"]["op_name"]] = by.get(e["args"]["op_name"], 0.0) + e["dur"]
        n = len(runs)
        step_ms = sum(e["dur"] for e in runs) / n / 1e3
        share = {k: v / n / 1e3 for k, v in sorted(by.items(), key=lambda kv: -kv[1])}
        out[ctx] = dict(step_ms=step_ms, kernel_ms=share, runs=n)
        print(f"{folder.name} ctx {ctx}: run {step_ms:.2f} ms/step over {n} runs; kernel ms/step: "
              + ", ".join(f"{k} {v:.2f}" for k, v in list(share.items())[:6]), flush=True)
        os.remove(fn)
    return out


def logsoftmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def cmd_quality(a) -> dict:
    folder = Path(a.artifact)
    d = dims(folder)
    rng = np.random.default_rng(a.seed)
    ref = session_for(folder, "fp32", d)
    n = a.length
    ids, refl = [int(rng.integers(0, d["V"] - 8))], np.empty((n - 1, d["V"]), np.float32)
    for p in range(n - 1):  # sample the text from the fp32-cache graph and keep its logits
        refl[p] = ref.step(ids[-1])
        lp = logsoftmax(refl[p])
        ids.append(int(rng.choice(d["V"], p=np.exp(lp) / np.exp(lp).sum())))
    del ref
    out = {}
    for v in a.variants:
        if v in ("fp32", "nospin", "t1", "noflash"):
            continue
        dec = session_for(folder, v, d)
        agree, kl = np.zeros(n - 1), np.zeros(n - 1)
        for p in range(n - 1):
            g = dec.step(ids[p])
            lr, lg = logsoftmax(refl[p]), logsoftmax(g)
            agree[p] = float(refl[p].argmax() == g.argmax())
            kl[p] = float((np.exp(lr) * (lr - lg)).sum())
        out[v] = {f"{lo}-{hi}": dict(top1=float(agree[lo:hi].mean()), kl=float(kl[lo:hi].mean()))
                  for lo, hi in ((0, 128), (128, n - 1), (0, n - 1))}
        print(f"{folder.name} {v} vs fp32 cache: " + "; ".join(
            f"positions {k}: top-1 {x['top1']:.4f} KL {x['kl']:.2e}" for k, x in out[v].items()), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["time", "paired", "attn", "profile", "quality"])
    p.add_argument("--artifact", required=True)
    p.add_argument("--variants", nargs="+", default=["fp32", "int8t", "int8c", "fp16", "nospin", "t1", "noflash"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--length", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append the result to this JSON file")
    p.add_argument("--out", default=str(OUT), help="where the variant graphs are written")
    a = p.parse_args()
    globals()["OUT"] = Path(a.out)
    t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res = {"time": cmd_time, "paired": cmd_paired, "attn": cmd_attn, "profile": cmd_profile, "quality": cmd_quality}[a.what](a)
    if a.json:
        path = Path(a.json)
        prev = json.loads(path.read_text()) if path.exists() else []
        prev.append(dict(what=a.what, artifact=Path(a.artifact).name, started=t0, args=vars(a), result=res))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(prev, indent=1))
        tmp.rename(path)


if __name__ == "__main__":
    main()
