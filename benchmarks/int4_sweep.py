"""int4 settings on the full-size model: the gate's quality rows, decode speed and quantize time of each.

Why: the shipped int4 setting is the fastest one that passes the int4 floor (export/floors.py);
which one that is depends on the quantizer (round-to-nearest, GPTQ, k-quant), the block size and
the symmetry, and only a measurement on the full-size weights says so. Every setting quantizes the
same fp32 artifact; the reference side (held-out text sampled from the fp32 PyTorch reference with
the gate's seed, and its logits) and GPTQ's calibration Hessians (text sampled from the fp32 graph
with another seed) are computed once and shared. Each row: top-1 / KL / perplexity ratio exactly
as the gate computes them (export.verify.quality, on model.onnx and on model.kv.onnx), decode tok/s
on model.kv.onnx (batch 1, after a 128-token prompt, 2 threads) and the quantize time.

    flock /work/locks/cpu.lock python benchmarks/int4_sweep.py --fp32 ARTIFACT --ckpt CHECKPOINT \
        --work /tmp/int4-sweep [--settings rtn-b32-asym gptq-b128-sym ...]

Writes benchmarks/results/int4_sweep.json and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path

from common import RESULTS, THREADS, log, markdown_table, peak_rss_bytes, write_json

import numpy as np  # noqa: E402

DEFAULT_SETTINGS = ["rtn-b32-asym", "rtn-b64-sym", "rtn-b64-asym", "rtn-b128-sym", "rtn-b128-asym",
                    "gptq-b64-sym", "gptq-b64-asym", "gptq-b128-sym", "gptq-b128-asym", "gptq-b32-asym",
                    "kquant-b64-asym", "kquant-b128-asym"]


def parse_setting(name: str) -> tuple[str, int, bool, int]:
    """'gptq-b128-sym' -> ('gptq', 128, True, 8): an 8-bit head (round to nearest) unless the name
    ends in -h4 (the head at 4 bits by the same quantizer)."""
    parts = name.split("-")
    head = 4 if parts[-1] == "h4" else 8
    parts = parts[:-1] if head == 4 else parts
    if len(parts) != 3:
        raise SystemExit(f"setting {name}: expected QUANTIZER-bBLOCK-sym|asym[-h4]")
    q, b, sym = parts
    if q not in ("rtn", "gptq", "kquant") or not b.startswith("b") or sym not in ("sym", "asym"):
        raise SystemExit(f"setting {name}: expected QUANTIZER-bBLOCK-sym|asym[-h4] with QUANTIZER rtn, gptq or kquant")
    if q == "kquant" and (sym == "sym" or head == 4):
        raise SystemExit(f"setting {name}: k-quant is asymmetric only (onnxruntime's k_quant writes zero points), 8-bit head")
    return q, int(b[1:]), sym == "sym", head


def kquant(src: Path, block: int):
    """onnxruntime's k_quant (vendored Intel Neural Compressor, no calibration) for the body, the
    head at 8 bits round-to-nearest like the other settings; asymmetric only."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from graphs.quantize import _head_nodes, lift_node_names

    model = onnx.load(str(src), load_external_data=False)
    exclude, head = lift_node_names(model), _head_nodes(model)
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=False, accuracy_level=4,
                             nodes_to_exclude=exclude + head, op_types_to_quantize=("MatMul",),
                             algo_config=KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",)))
    q.process()
    q = MatMulNBitsQuantizer(q.model.model, bits=8, block_size=block, is_symmetric=False, accuracy_level=4,
                             nodes_to_include=head, nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
    q.process()
    out = q.model.model
    out.graph.ClearField("value_info")
    return out


def nbits_nodes(model) -> list[str]:
    """Distinct (bits, block, accuracy level, zero points?) of the MatMulNBits nodes: the kernel path."""
    kinds = set()
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            kinds.add(f"{a.get('bits')}b blk{a.get('block_size')} acc{a.get('accuracy_level', 0)} "
                      f"{'zp' if len(n.input) > 3 and n.input[3] else 'sym'}")
    return sorted(kinds)


def _busy() -> tuple[float, float, float]:
    """(busy CPU-seconds of all CPUs, total CPU-seconds, this process's CPU-seconds)."""
    import os

    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (sum(vals) - vals[3] - vals[4]) / hz, sum(vals) / hz, t.user + t.system


def decode_tok_s(folder: Path, cfg, steps: int = 48, prompt: int = 128) -> tuple[float, float]:
    """(tok/s of `steps` greedy steps on model.kv.onnx after a `prompt`-token prompt, the CPU share
    other processes took meanwhile: a figure with a share above a few % is not comparable)."""
    import onnxruntime as ort

    from export.gate_drivers import KvLM
    from runtime.interface import KV_MODEL_FILE

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(folder / KV_MODEL_FILE), so, providers=["CPUExecutionProvider"])
    kv = KvLM(folder, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size, ["CPUExecutionProvider"],
              prompt + steps + 8, session=sess)
    ids = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 50000), (1, prompt))
    tok = int(kv.prefill(ids)[0, -1].argmax())
    tok = int(kv.step([tok])[0, -1].argmax())  # warm-up step
    b0, t0, own0 = _busy()
    start = time.perf_counter()
    for _ in range(steps):
        tok = int(kv.step([tok])[0, -1].argmax())
    rate = steps / (time.perf_counter() - start)
    b1, t1, own1 = _busy()
    return rate, round(max(0.0, (b1 - b0) - (own1 - own0)) / max(t1 - t0, 1e-9), 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", type=Path, required=True, help="a full-size fp32 artifact folder (python -m export build)")
    p.add_argument("--ckpt", type=Path, required=True, help="the checkpoint it was built from (the reference)")
    p.add_argument("--work", type=Path, required=True, help="scratch folder for the quantized artifacts")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--calibration", nargs=2, type=int, default=[16, 128], metavar=("SEQS", "TOKENS"))
    p.add_argument("--out", type=Path, default=RESULTS / "int4_sweep.json")
    p.add_argument("--speed-rounds", type=int, default=0,
                   help="after the quality rows, time every setting's decode this many more times, interleaved "
                        "(the settings' folders are kept until then); the row gets the median")
    args = p.parse_args(argv)
    settings = [(s, *parse_setting(s)) for s in args.settings]

    import onnx

    from export.floors import floors_for
    from export.graph import load_reference
    from export.gate_drivers import KvLM, OrtLM, positions
    from export.gate_reference import heldout_tokens, ref_logits
    from export.verify import quality
    from export.writer import save_onnx
    from graphs.gqa import kv_graph
    from graphs.quantize import _weight_matmuls, lift_node_names, quantize_nbits
    from runtime.interface import KV_MODEL_FILE, MODEL_FILE

    args.work.mkdir(parents=True, exist_ok=True)
    ref_file = args.work / "reference.npz"
    ref = dict(np.load(ref_file)) if ref_file.is_file() else {}
    lm = load_reference(args.ckpt, None, {})
    cfg = lm.cfg
    if "ids" not in ref:  # the gate's held-out text and logits (export.gate_reference.expectations makes the same call)
        t0 = time.perf_counter()
        ref["ids"], source, ref["logits"] = heldout_tokens(lm, args.fp32, 4, 64, log)
        if ref["logits"] is None:
            ref["logits"] = ref_logits(lm, ref["ids"])
        log(f"sweep: reference held-out text ({source}) in {time.perf_counter() - t0:.0f} s")
    if "rand_ids" not in ref:  # uniform random ids: text unlike the calibration's, a robustness column
        ref["rand_ids"] = np.random.default_rng(99).integers(0, cfg.vocab_size, (4, 64))
        ref["rand_logits"] = ref_logits(lm, ref["rand_ids"])
    np.savez(ref_file, **ref)
    held_ids, held_logits = ref["ids"], ref["logits"]
    del lm
    gc.collect()
    fl = floors_for("int4")

    hessians, calib = None, {}
    if any(q == "gptq" for _, q, _, _, _ in settings):
        from graphs.gptq import calibration_hessians

        m = onnx.load(str(args.fp32 / MODEL_FILE), load_external_data=False)
        skip = set(lift_node_names(m))  # the head's input too: the -h4 settings quantize it
        inputs = sorted({n.input[0] for n in _weight_matmuls(m, skip)})
        del m
        t0 = time.perf_counter()
        hessians, seen = calibration_hessians(args.fp32 / MODEL_FILE, inputs, *args.calibration, log=log)
        calib = {"tokens": seen, "seconds": round(time.perf_counter() - t0, 1), "inputs": len(inputs)}
        log(f"sweep: calibration {calib}")

    rows = []
    for name, q, block, sym, head in settings:
        log(f"sweep: {name}")
        folder = args.work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        if q == "kquant":
            model, rep = kquant(args.fp32 / MODEL_FILE, block), {}
        else:
            model, rep = quantize_nbits(args.fp32 / MODEL_FILE, bits=4, block_size=block, is_symmetric=sym, head_bits=head,
                                        quantizer=q, hessians=hessians, log=log)
        quant_s = time.perf_counter() - t0
        kernels = nbits_nodes(model)
        save_onnx(model, folder / MODEL_FILE, data_name=MODEL_FILE + ".data")
        del model
        gc.collect()
        for f in ("config.json", "generation_config.json"):
            shutil.copy(args.fp32 / f, folder / f)
        (folder / KV_MODEL_FILE).write_bytes(kv_graph(folder).SerializeToString())
        m = OrtLM(folder, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size, ["CPUExecutionProvider"])
        mask = np.ones_like(held_ids)
        qs = quality(held_logits, m(held_ids, mask, positions(mask))[0], held_ids)
        qr = quality(ref["rand_logits"], m(ref["rand_ids"], mask, positions(mask))[0], ref["rand_ids"])
        del m
        kv = KvLM(folder, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size, ["CPUExecutionProvider"],
                  held_ids.shape[1])
        qk = quality(held_logits, np.concatenate([kv.prefill(r[None]) for r in held_ids]), held_ids)
        del kv
        gc.collect()
        tok_s, others = decode_tok_s(folder, cfg)
        passed = all(x["top1"] >= fl["top1"] and x["kl"] <= fl["kl"] and x["ppl_ratio"] <= fl["ppl_ratio"]
                     for x in (qs, qk))
        row = {"setting": name, "quantizer": q, "block": block, "symmetric": sym, "head_bits": head,
               "top1": qs["top1"], "kl": qs["kl"], "ppl_ratio": qs["ppl_ratio"],
               "kv_top1": qk["top1"], "kv_kl": qk["kl"], "kv_ppl_ratio": qk["ppl_ratio"], "passes_floor": passed,
               "random_ids_top1": qr["top1"], "random_ids_kl": qr["kl"],
               "decode_kv_tok_s": tok_s, "decode_other_processes_cpu_fraction": others, "quantize_s": round(quant_s, 1), "kernels": kernels,
               "gptq_s": rep.get("gptq_s")}
        rows.append(row)
        log(f"sweep: {row}")
        if not args.speed_rounds:
            shutil.rmtree(folder, ignore_errors=True)
        write_json(args.out, {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "fp32": str(args.fp32),
                              "calibration": calib, "floors": fl, "threads": THREADS, "rows": rows,
                              "peak_rss_bytes": peak_rss_bytes()})
    if args.speed_rounds:  # the same decode timing, interleaved over the settings: the host's drift hits all alike
        import statistics

        for r in range(args.speed_rounds):
            for row in rows:
                tok_s, others = decode_tok_s(args.work / row["setting"], cfg)
                row.setdefault("decode_rounds", []).append({"tok_s": tok_s, "other_processes_cpu_fraction": others})
                log(f"sweep: speed round {r + 1}: {row['setting']} {tok_s:.1f} tok/s (others {others:.0%})")
        for row in rows:
            row["decode_kv_tok_s"] = statistics.median(x["tok_s"] for x in row["decode_rounds"])
            shutil.rmtree(args.work / row["setting"], ignore_errors=True)
        write_json(args.out, {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "fp32": str(args.fp32),
                              "calibration": calib, "floors": fl, "threads": THREADS, "rows": rows,
                              "peak_rss_bytes": peak_rss_bytes()})
    header = ["setting", "top-1", "KL", "ppl ratio", "kv top-1", "floor", "random ids top-1 / KL", "decode tok/s (kv)",
              "quantize s", "kernel"]
    print(markdown_table(header, [[r["setting"], f"{r['top1']:.3f}", f"{r['kl']:.3f}", f"{r['ppl_ratio']:.3f}",
                                   f"{r['kv_top1']:.3f}", "pass" if r["passes_floor"] else "FAIL",
                                   f"{r['random_ids_top1']:.3f} / {r['random_ids_kl']:.3f}",
                                   f"{r['decode_kv_tok_s']:.1f}", r["quantize_s"], "; ".join(r["kernels"])]
                                  for r in rows]))
    print(f"calibration: {calib}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
