"""How much time the runtime's generation loop adds on top of ONNX Runtime itself, during decode.

For the same prompt and the same tokens (greedy, N steps), these loops are timed, interleaved and
repeated, medians kept:
  generate   runtime.Model.generate: checks, binding, argmax, stop logic, text decode (on the
             shared-cache graph model.kv.onnx when the artifact has one, as apps get it)
  bare_kv    the minimum on model.kv.onnx: everything bound once, the token and lengths written
             into the bound arrays, Run, argmax of the logits
  bare_iob   the minimum on model.onnx with IO binding: bind, Run, argmax of the logits
  bare_run   plain `session.run` on model.onnx with numpy in and out, argmax (what a first attempt looks like)
Every bare loop picks the next token with an argmax, as any generation loop must; the tokens it
feeds are the known greedy ones, so all loops run the very same Runs.
overhead = (generate - bare) / generate, against each bare loop. Target: <= 3 % of decode time.

Artifacts: the tiny one (built here with the exporter when torch is installed, or --model DIR),
plus every artifact folder found under benchmarks/cache/ (a full-size export, when one exists).

    .venv/bin/python benchmarks/runtime_overhead.py [--model DIR ...] [--steps 64] [--repeats 7]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CACHE, RESULTS, log, text_table, write_json

import runtime
from runtime import interface as I


def tiny_artifact(work: Path) -> Path:
    """Export the tests' tiny checkpoint shape (V 65,536, d 64, 2 layers) in bitwise mode."""
    from export.build import build
    from reference.config import CodeConfig, tiny_config
    from reference.factory import make_checkpoint
    from reference.lift import random_invertible_gf2

    A, b = random_invertible_gf2(16, seed=1)
    ckpt = make_checkpoint(work / "ckpt", tiny_config(code=CodeConfig(A=A, b=b)), seed=0)
    return build(ckpt, work / "tiny-bitwise", lift_mode="bitwise", log=lambda m: None)


def bare_iob(m: runtime.Model, prompt: list[int], tokens: list[int]) -> float:
    """The ORT work alone: the same Runs through IO binding, nothing else."""
    ort, sess = m._ort, m.session
    past_names, out_names = I.past_names(m.num_layers), I.output_names(m.num_layers)
    S = len(prompt)
    ids = np.asarray([prompt], np.int64)
    mask = np.ones((1, S + len(tokens)), np.int64)
    t0 = time.perf_counter()
    b = sess.io_binding()
    b.bind_cpu_input(I.INPUT_IDS, ids)
    b.bind_cpu_input(I.ATTENTION_MASK, mask[:, :S])
    b.bind_cpu_input(I.POSITION_IDS, np.arange(S, dtype=np.int64)[None])
    z = np.zeros((1, m.num_heads, 0, m.head_size), m.past_dtype)
    for n in past_names:
        b.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(z))
    for n in out_names:
        b.bind_output(n, "cpu")
    sess.run_with_iobinding(b)
    out = b.get_outputs()
    int(out[0].numpy()[0, -1].argmax())  # choosing the next token is part of any loop
    for step, t in enumerate(tokens[:-1]):
        b = sess.io_binding()
        b.bind_cpu_input(I.INPUT_IDS, np.asarray([[t]], np.int64))
        b.bind_cpu_input(I.ATTENTION_MASK, mask[:, : S + step + 1])
        b.bind_cpu_input(I.POSITION_IDS, np.asarray([[S + step]], np.int64))
        for n, v in zip(past_names, out[1:]):
            b.bind_ortvalue_input(n, v)
        for n in out_names:
            b.bind_output(n, "cpu")
        sess.run_with_iobinding(b)
        out = b.get_outputs()
        int(out[0].numpy()[0, -1].argmax())  # choosing the next token is part of any loop
    return time.perf_counter() - t0


def bare_kv(m: runtime.Model, prompt: list[int], tokens: list[int]) -> float:
    """The ORT work alone on the shared-cache graph: one binding, inputs written in place, Run."""
    ort, sess = m._ort, m.kv_session
    past_names, present_names = I.past_names(m.num_layers), I.present_names(m.num_layers)
    S = len(prompt)
    t0 = time.perf_counter()
    shape = (1, m.num_heads, S + len(tokens), m.head_size)
    host = [np.zeros(shape, m.kv_past_dtype) for _ in past_names]
    b = sess.io_binding()
    logits = np.empty((1, 1, m.vocab_size), np.float32)
    b.bind_output(I.LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    for pn, on, a in zip(past_names, present_names, host):
        v = ort.OrtValue.ortvalue_from_numpy(a)
        b.bind_ortvalue_input(pn, v)
        b.bind_ortvalue_output(on, v)
    seqlens, total, keep = np.array([S - 1], np.int32), np.array(S, np.int32), np.array([1], np.int64)
    b.bind_cpu_input(I.INPUT_IDS, np.asarray([prompt], np.int64))
    # OrtValues over the numpy arrays (shared memory): writing the arrays changes the next Run's inputs
    held = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in ((I.SEQLENS_K, seqlens), (I.TOTAL_SEQUENCE_LENGTH, total),
                                                              (I.LOGITS_TO_KEEP, keep))}
    for n, v in held.items():
        b.bind_ortvalue_input(n, v)
    sess.run_with_iobinding(b)
    int(logits[0, -1].argmax())
    tok = np.zeros((1, 1), np.int64)
    tok_value = ort.OrtValue.ortvalue_from_numpy(tok)
    b.bind_ortvalue_input(I.INPUT_IDS, tok_value)
    for step, t in enumerate(tokens[:-1]):
        tok[0, 0] = t
        seqlens[0] = S + step
        total[()] = S + step + 1
        sess.run_with_iobinding(b)
        int(logits[0, -1].argmax())
    return time.perf_counter() - t0


def bare_run(m: runtime.Model, prompt: list[int], tokens: list[int]) -> float:
    """Plain session.run with numpy: what a first attempt looks like (the cache copied each step)."""
    sess = m.session
    past_names = I.past_names(m.num_layers)
    S = len(prompt)
    z = np.zeros((1, m.num_heads, 0, m.head_size), m.past_dtype)
    t0 = time.perf_counter()
    feed = {I.INPUT_IDS: np.asarray([prompt], np.int64), I.ATTENTION_MASK: np.ones((1, S), np.int64),
            I.POSITION_IDS: np.arange(S, dtype=np.int64)[None], **{n: z for n in past_names}}
    out = sess.run(None, feed)
    int(out[0][0, -1].argmax())
    for step, t in enumerate(tokens[:-1]):
        feed = {I.INPUT_IDS: np.asarray([[t]], np.int64), I.ATTENTION_MASK: np.ones((1, S + step + 1), np.int64),
                I.POSITION_IDS: np.asarray([[S + step]], np.int64), **dict(zip(past_names, out[1:]))}
        out = sess.run(None, feed)
        int(out[0][0, -1].argmax())
    return time.perf_counter() - t0


class TimedSession:
    """Delegates to the real session and adds up the seconds spent inside Run calls."""

    def __init__(self, sess):
        self._sess, self.run_s = sess, 0.0

    def run_with_iobinding(self, binding, *a):
        t0 = time.perf_counter()
        self._sess.run_with_iobinding(binding, *a)
        self.run_s += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._sess, name)


def inline_overhead(m: runtime.Model, prompt: list[int], kw: dict, repeats: int) -> float:
    """Share of generate's wall time spent outside ORT's Run, measured within the same calls
    (so other processes' noise hits both sides alike). Binding and the logits copy count as overhead."""
    attr = "kv_session" if m.kv_session is not None else "_session"  # the session generate runs on
    real = getattr(m, attr) if attr == "kv_session" else m.session
    shares = []
    try:
        for _ in range(repeats):
            timed = TimedSession(real)
            setattr(m, attr, timed)
            t0 = time.perf_counter()
            m.generate(prompt, **kw)
            total = time.perf_counter() - t0
            shares.append((total - timed.run_s) / total)
    finally:
        setattr(m, attr, real)
    return statistics.median(shares)


def measure(folder: Path, steps: int, repeats: int, threads: int | None) -> dict:
    m = runtime.load(folder, provider="cpu", threads=threads)
    steps = min(steps, m.context_length - 8)
    prompt = list(range(65, 73))  # 8 tokens: the prefill is small and identical in every loop
    tokens = m.generate(prompt, max_new_tokens=steps).ids
    kw = dict(max_new_tokens=steps)
    if len(tokens) < steps:  # an end token came early: ban it so every loop runs the same steps
        kw["min_new_tokens"] = steps
        tokens = m.generate(prompt, **kw).ids

    def gen() -> float:
        t0 = time.perf_counter()
        r = m.generate(prompt, **kw)
        dt = time.perf_counter() - t0
        assert r.ids == tokens, "generate is not deterministic: the comparison would be meaningless"
        return dt

    loops = {"generate": gen, "bare_iob": lambda: bare_iob(m, prompt, tokens), "bare_run": lambda: bare_run(m, prompt, tokens)}
    if m.kv_session is not None:
        loops["bare_kv"] = lambda: bare_kv(m, prompt, tokens)
    for f in loops.values():  # warm up: first-run allocations and thread pools
        f()
    times: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(repeats):
        for k, f in loops.items():
            times[k].append(f())
    inline = inline_overhead(m, prompt, kw, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # least disturbed by other processes
    g = med["generate"]
    return {
        "artifact": str(folder),
        "provider": m.provider,
        "threads": threads,
        "steps": len(tokens),
        "params_hidden": m.info.config["hidden_size"],
        "layers": m.num_layers,
        "median_s": med,
        "ms_per_token": {k: 1e3 * v / len(tokens) for k, v in med.items()},
        "overhead_outside_run": inline,
        "graph": "model.kv.onnx" if m.kv_session is not None else "model.onnx",
        "overhead_vs_bare_kv": (g - med["bare_kv"]) / g if "bare_kv" in med else None,
        "overhead_vs_bare_kv_min": (best["generate"] - best["bare_kv"]) / best["generate"] if "bare_kv" in best else None,
        "overhead_vs_bare_iob": (g - med["bare_iob"]) / g,
        "overhead_vs_bare_run": (g - med["bare_run"]) / g,
        "overhead_vs_bare_iob_min": (best["generate"] - best["bare_iob"]) / best["generate"],
        "overhead_vs_bare_run_min": (best["generate"] - best["bare_run"]) / best["generate"],
        "spread_generate": (max(times["generate"]) - min(times["generate"])) / g,
        "all_s": times,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", type=Path, default=[], help="artifact folder (repeatable)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-cache", action="store_true", help="skip the full-size artifacts under benchmarks/cache/")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtime_overhead.json")
    args = ap.parse_args()
    folders = list(args.model)
    tmp = None
    if not folders:
        tmp = tempfile.TemporaryDirectory()
        folders.append(tiny_artifact(Path(tmp.name)))
    if CACHE.is_dir() and not args.no_cache:
        folders += sorted(p.parent for p in CACHE.glob("**/" + I.MANIFEST_FILE))
    rows = []
    for f in folders:
        log(f"[bench] {f}")
        rows.append(measure(f, args.steps, args.repeats, args.threads))
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    header = ["artifact", "steps", "generate ms/tok", "bare_kv ms/tok", "bare_iob ms/tok", "bare_run ms/tok",
              "ovh/kv median", "ovh/iob median", "ovh/run median", "ovh/kv best", "ovh/run best", "outside Run"]
    table = []
    for r in rows:
        t = r["ms_per_token"]
        table.append((Path(r["artifact"]).name[:28], r["steps"], f"{t['generate']:.3f}",
                      f"{t['bare_kv']:.3f}" if "bare_kv" in t else "-", f"{t['bare_iob']:.3f}", f"{t['bare_run']:.3f}",
                      pct(r["overhead_vs_bare_kv"]), pct(r["overhead_vs_bare_iob"]), pct(r["overhead_vs_bare_run"]),
                      pct(r["overhead_vs_bare_kv_min"]), pct(r["overhead_vs_bare_run_min"]), pct(r["overhead_outside_run"])))
    print(text_table(header, table))
    write_json(args.out, {"host": platform.node(), "python": platform.python_version(),
                          "onnxruntime": __import__("onnxruntime").__version__,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": rows})
    log(f"[bench] wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
