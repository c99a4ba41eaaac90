"""`build()`: a checkpoint folder (or hub id) -> a verified artifact folder, in named, timed stages.

Stages: check arguments, load, trace, graph passes, lift, precision, save, verify, manifest. All
cheap argument checks come first so a bad invocation fails in well under a second. The artifact
is assembled by an `ArtifactWriter` (export/writer.py) in a temporary sibling of `out` and moved
into place only when the gate passed.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.interface import DATA_FILE, KV_MODEL_FILE, MODEL_FILE, PRECISIONS

from .errors import ExportError
from .floors import context_too_short
from .graph import apply_overrides, export_isolated, load_reference
from .progress import Stages
from .trace import DEFAULT_OPSET
from .writer import ArtifactWriter, disk_full_error

PROVIDERS = ("cpu", "cuda")
OPSET_RANGE = (18, 23)  # LayerNormalization needs >= 17; onnxruntime 1.31 runs up to 23
INT_BLOCK_SIZE = 128  # MatMulNBits block for int8 (accuracy level 4: int8 compute)
# int4, per --quantizer: the fastest setting that meets the int4 floors on the full model
# (benchmarks/RESULTS.md, "int4 quality on the full model"; benchmarks/int4_sweep.py measures them).
# gptq, block 256 symmetric, head 4-bit too: top-1 0.873 / KL 0.062 / ppl x1.10, 97.8 tok/s decode;
# rtn needs block 32 asymmetric and an 8-bit head to pass (0.758 / 0.176 / x1.149, 77.6 tok/s);
# round to nearest at block 128 symmetric fails (0.675 / 0.314 / x1.33).
INT4_QUANTIZER = "gptq"  # the default: calibrated (graphs/gptq.py)
INT4_SETTINGS = {"gptq": {"block_size": 256, "is_symmetric": True, "head_bits": 4},
                 "rtn": {"block_size": 32, "is_symmetric": False, "head_bits": 8}}
CUDA_INT4_MAX_BLOCK = 128  # ORT's CUDA 4-bit kernel for one row throws past 128 (runtime/sessions.py)
INT4_CALIBRATION = (16, 128)  # GPTQ: sequences x tokens sampled from the fp32 graph (78 s at full size)


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP during a build, raised like Ctrl-C so every cleanup on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def exit_signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Terminated` in the main thread while the build runs (their default
    ends the process without running `finally`, which would leave the staging folders behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    old = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def default_out(model_name: str, lift_mode: str, precision: str) -> Path:
    return Path("artifacts") / f"{model_name}-{lift_mode}-{precision}"


def check_out_vs_model(out: Path, model_dir: Path) -> None:
    """--out must not be the checkpoint folder, inside it, or around it: replacing it would delete the checkpoint."""
    o, m = out.expanduser().resolve(), model_dir.expanduser().resolve()
    if o == m or m in o.parents or o in m.parents:
        where = "is" if o == m else "is inside" if m in o.parents else "contains"
        raise ExportError(f"--out {out} {where} the model folder {model_dir}; choose an --out outside it "
                          "(the artifact folder is replaced as a whole, which would delete the checkpoint)")


def check_arguments(out: Path, lift_mode: str, precision: str, provider: str, opset: int, force: bool,
                    trust_remote_code: bool, overrides: dict, kv_graph: bool = True,
                    model_dir: Path | None = None, quantizer: str | None = None) -> None:
    """Everything that can be refused without reading a weight."""
    from graphs.lift import EXPORT_MODES
    from graphs.quantize import QUANTIZERS

    if quantizer is not None and quantizer not in QUANTIZERS:
        raise ExportError(f"--quantizer {quantizer}: unknown; choose one of {', '.join(QUANTIZERS)}")
    if quantizer is not None and precision != "int4":
        raise ExportError(f"--quantizer {quantizer} applies to --precision int4 only (asked for {precision}); drop it")

    if lift_mode not in EXPORT_MODES:
        raise ExportError(f"--code {lift_mode}: unknown lift mode; choose one of {', '.join(EXPORT_MODES)}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision}: unknown; choose one of {', '.join(PRECISIONS)}")
    if provider not in PROVIDERS:
        raise ExportError(f"--provider {provider}: unknown; choose cpu or cuda")
    if lift_mode == "bitwise" and provider == "cuda":
        raise ExportError("--code bitwise cannot target --provider cuda: ONNX Runtime has BitShift/BitwiseAnd on the "
                          "CPU provider only, so nodes would fall back to the CPU; use --code arith or --code lookup")
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ExportError(f"--opset {opset}: supported range is {OPSET_RANGE[0]}..{OPSET_RANGE[1]} (default {DEFAULT_OPSET})")
    if trust_remote_code:
        import importlib.util

        from .remote import NO_TRANSFORMERS

        if importlib.util.find_spec("transformers") is None:
            raise ExportError(NO_TRANSFORMERS)
    from reference.config import BIT_ORDERS, TILINGS, VALUE_MAPS

    for key, allowed in (("bit_order", BIT_ORDERS), ("values", VALUE_MAPS), ("tiling", TILINGS)):
        if overrides.get(key) is not None and overrides[key] not in allowed:
            raise ExportError(f"--{key.replace('_', '-')} {overrides[key]}: choose one of {', '.join(allowed)}")
    if model_dir is not None:
        check_out_vs_model(out, model_dir)
    if out.exists() and not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it (the old one stays until the new one passed)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder; choose another --out")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{out.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write to {parent} ({e.strerror or e}); choose a writable folder") from None


def read_key_map(path: str | os.PathLike | dict | None) -> dict | None:
    """--key-map through the reference's one reader (reference.adapter.read_key_map), as an ExportError."""
    from reference.adapter import read_key_map as read
    from reference.checkpoint import CheckpointError

    try:
        return read(path) if path is not None else None
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def say_remote_files(folder: Path, log: Callable[[str], None]) -> None:
    """--trust-remote-code: name the folder's files that will run, before any of them does."""
    from .remote import remote_code_files

    files = remote_code_files(folder)
    log(f"[export] --trust-remote-code will run code from {folder}: {', '.join(files) if files else 'no .py file found'}")


def table_mode(cfg, lift_mode: str, out: Path, folder: Path, precision: str,
               log: Callable[[str], None]) -> tuple[str, Path]:
    """A checkpoint with an input embedding table exports in lift mode table, and only it does."""
    from graphs.lift import TABLE_MODE

    if cfg.input_table and lift_mode != TABLE_MODE:
        log(f"[export] {folder.name} has an input embedding table [{cfg.vocab_size}, {cfg.hidden_size}] (a learned-table "
            f"model, not table-free): exporting with lift mode {TABLE_MODE} instead of {lift_mode}")
        if out == default_out(folder.name, lift_mode, precision):
            out = default_out(folder.name, TABLE_MODE, precision)
        return TABLE_MODE, out
    if lift_mode == TABLE_MODE and not cfg.input_table:
        raise ExportError(f"--code {TABLE_MODE}: {folder} has no input embedding table (embed_tokens.weight / wte.weight "
                          "[V, d]); a table-free checkpoint exports with --code bitwise, arith or lookup")
    return lift_mode, out


def note_folder_code(folder: Path, log: Callable[[str], None]) -> None:
    """Say so when a folder ships model code that this build does not run (SPEC 2: only on request)."""
    from .remote import has_model_code

    if has_model_code(folder):
        log(f"[export] note: {folder.name} ships its own model code (auto_map in config.json); it was not run. "
            "Pass --trust-remote-code to check the reference against it")


def convert_precision(src: Path, w: ArtifactWriter, precision: str, quantizer: str | None = None,
                      log: Callable[[str], None] = print, max_len: int = INT4_CALIBRATION[1],
                      provider: str = "cpu") -> dict | None:
    """fp32 graph (the trace's work folder) -> model.onnx + model.onnx.data of the requested precision;
    returns the quantizer's report for the manifest (None for fp32 / fp16). `max_len`: the model's
    longest sequence (GPTQ's calibration sequences are no longer)."""
    if precision == "fp32":
        w.adopt(MODEL_FILE, src)
        w.adopt(DATA_FILE, src.parent / DATA_FILE)
        return None
    from graphs import quantize

    report = None
    if precision == "fp16":
        model, _ = quantize.to_fp16(src)
    elif precision == "int8":
        # weight-only 8-bit MatMulNBits, block 128, int8 compute: 52 tok/s decode on the full model
        # against 45 for MatMulInteger with activations quantized per call (benchmarks/RESULTS.md)
        model, report = quantize.quantize_nbits(src, bits=8, block_size=INT_BLOCK_SIZE)
    else:
        quantizer = quantizer or INT4_QUANTIZER
        calibration = (INT4_CALIBRATION[0], min(INT4_CALIBRATION[1], max_len))
        settings = dict(INT4_SETTINGS[quantizer])
        if provider == "cuda":
            settings["block_size"] = min(settings["block_size"], CUDA_INT4_MAX_BLOCK)
        model, report = quantize.quantize_nbits(src, bits=4, quantizer=quantizer, calibration=calibration, log=log,
                                                **settings)
    w.save_model(MODEL_FILE, model, DATA_FILE)
    if report is not None:
        report = {k: v for k, v in report.items() if k != "excluded_nodes"}
        report["peak_rss_bytes"] = _peak_rss()
        log(f"  {precision}: {report.get('quantizer', 'rtn')}, block {report['block_size']}, "
            f"{'symmetric' if report['is_symmetric'] else 'asymmetric'}, head {report['head_bits']}-bit; "
            f"peak RSS so far {report['peak_rss_bytes'] / 1e9:.2f} GB")
    return report


def _peak_rss() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def write_kv(w: ArtifactWriter) -> dict:
    """The shared-cache decoder graph beside model.onnx (graphs/gqa.py); its manifest entry.

    Asked for by default (`--no-kv-graph` opts out): the runtime generates on it because a decode
    step then writes one cache position instead of copying the whole cache (benchmarks/RESULTS.md).
    A graph it cannot be built from fails the build rather than shipping a slower artifact unasked.
    """
    from graphs.gqa import GQAError, kv_graph

    try:
        kv = kv_graph(w.folder)
    except GQAError as e:
        raise ExportError(f"cannot build {KV_MODEL_FILE}, the shared-cache decoder graph: {e}. Pass --no-kv-graph "
                          f"to export without it (the runtime then serves every call with {MODEL_FILE})") from None
    from graphs.genai_kv import GENAI_KV_MODEL_FILE, to_genai_kv

    w.write_model(KV_MODEL_FILE, kv)
    w.write_model(GENAI_KV_MODEL_FILE, to_genai_kv(kv))  # the same graph fed by attention_mask, for genai
    # where RoPE runs: in the attention op (whole heads), or in RotaryEmbedding nodes in front of it
    # (partial rotary, or heads the op's own rotary refuses: graphs/rotary.py)
    ahead = any(n.op_type == "RotaryEmbedding" for n in kv.graph.node)
    return {"file": KV_MODEL_FILE, "cache": "one [batch, heads, max_len, head_size] buffer per layer, past == present",
            "op": "com.microsoft.GroupQueryAttention", "padding": "right", "genai_file": GENAI_KV_MODEL_FILE,
            "rotary": "com.microsoft.RotaryEmbedding before the attention op" if ahead else "in the attention op"}


def verify_providers(provider: str, log: Callable[[str], None], folder: Path, precision: str) -> str:
    """The provider the gate runs on: cuda when asked and installed, else cpu with a warning. Asked for
    cuda, the graphs first meet ONNX Runtime's CUDA kernel table, GPU or not (export/gate_cuda.py)."""
    if provider != "cuda":
        return "cpu"
    import onnxruntime as ort
    from .gate_cuda import check_cuda_ready

    log(f"  {check_cuda_ready(folder, precision)}")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return "cuda"
    log("warning: CUDAExecutionProvider is not installed here (onnxruntime CPU build); the parity gate runs on "
        "the CPU provider - run it on a CUDA machine with onnxruntime-gpu to verify there")
    return "cpu"


def build(model: str | os.PathLike | None, out: str | os.PathLike | None = None, lift_mode: str = "bitwise",
          precision: str = "fp32", provider: str = "cpu", opset: int | None = None, force: bool = False,
          verify: bool = True, key_map: str | os.PathLike | dict | None = None, trust_remote_code: bool = False,
          log: Callable[[str], None] = print, *, bit_order: str | None = None, values: str | None = None,
          tiling: str | None = None, scale: float | None = None, progress: bool = False, kv_graph: bool = True,
          quantizer: str | None = None, _lift_code=None) -> Path:
    """Export `model` to a verified artifact folder and return its path; raises ExportError.

    `lift_mode` is how the graph computes the lift (LIFT_MODES; the CLI's --code).
    `progress` draws a bar on stderr for the parity gate when stderr is a terminal (the CLI sets it).
    `kv_graph` adds model.kv.onnx, the shared-cache decoder graph (checked by the same gate); when
    it cannot be built the build fails unless `kv_graph=False`.
    `quantizer` (int4 only): "gptq" (the default, INT4_QUANTIZER) or "rtn".
    """
    from .hub import resolve_source

    opset = DEFAULT_OPSET if opset is None else int(opset)
    overrides = {"bit_order": bit_order, "values": values, "tiling": tiling, "scale": scale}
    stages = Stages(log)
    local = Path(model).expanduser() if model is not None else None
    model_dir = local if local is not None and local.is_dir() else None
    if out is not None:  # refuse a bad --out before touching the network or any weight
        check_arguments(Path(out), lift_mode, precision, provider, opset, force, trust_remote_code, overrides,
                        kv_graph, model_dir, quantizer)
    with stages("load"):
        folder, source_info = resolve_source(model, with_code=trust_remote_code)
        out = Path(out) if out is not None else default_out(folder.name, lift_mode, precision)
        check_arguments(out, lift_mode, precision, provider, opset, force, trust_remote_code, overrides,
                        kv_graph, folder, quantizer)
        if trust_remote_code:
            say_remote_files(folder, log)
        key_map = read_key_map(key_map)
        lm = load_reference(folder, key_map, overrides)  # validates everything before the long stages
        from .artifact import check_tokenizer_files

        check_tokenizer_files(folder)  # a broken tokenizer_config.json or chat template, now rather than after the gate
        lift_mode, table_out = table_mode(lm.cfg, lift_mode, out, folder, precision, log)
        if table_out != out:
            out = table_out
            check_arguments(out, lift_mode, precision, provider, opset, force, trust_remote_code, overrides,
                            kv_graph, folder)
        from .remote import has_model_code
        from .remote_tokenizer import tokenizer_stage

        remote_tok, tok_manifest = tokenizer_stage(folder, lm.cfg.vocab_size, trust_remote_code, log)
        if trust_remote_code and (remote_tok is None or has_model_code(folder)):
            from .remote import check_remote

            check = check_remote(folder, lm, log)
            overrides.update(check.conventions)  # the trace child and the gate build the same reference
            apply_overrides(lm.cfg, overrides)
            source_info["remote_code"] = check.to_dict()
        elif not trust_remote_code:
            note_folder_code(folder, log)
    cfg = lm.cfg
    if kv_graph and cfg.head_size % 8:  # before the long stages: no kv graph is never silent
        raise ExportError(f"cannot build {KV_MODEL_FILE}: ONNX Runtime's GroupQueryAttention takes heads of a "
                          f"multiple of 8 features and this model's are {cfg.head_size}; pass --no-kv-graph "
                          f"(the runtime then serves every call with {MODEL_FILE})")
    if verify and context_too_short(cfg.max_position_embeddings):  # before the long stages, as above
        raise ExportError(context_too_short(cfg.max_position_embeddings))
    del lm  # the trace runs in a child process and the gate reloads the reference (export_isolated)
    log(f"[export] model {folder} (V {cfg.vocab_size}, d {cfg.hidden_size}, {cfg.num_hidden_layers} layers) "
        f"-> {out} [{lift_mode}, {precision}, opset {opset}]")
    out = out.absolute()
    try:
        with exit_signals_raise(), ArtifactWriter(out) as w:
            fp32 = export_isolated(folder, key_map, overrides, w.work, lift_mode, opset, stages, lift_code=_lift_code)
            with stages("precision"):
                quant_info = convert_precision(fp32, w, precision, quantizer, log, cfg.max_position_embeddings, provider)
            with stages("files"):
                from . import artifact

                artifact.write_config(w, cfg)
                artifact.write_generation_config(w, cfg, folder)
                artifact.copy_tokenizer(w, folder, cfg.vocab_size, remote=remote_tok)
            kv_info = {"file": None, "reason": "--no-kv-graph"}
            if kv_graph:
                with stages("kv graph"):
                    kv_info = write_kv(w)
            artifact.write_genai_config(w, cfg, provider, shared_buffer=kv_graph)
            parity, verified, passed = {"skipped": "--no-verify"}, [], True
            if verify:
                from .progress import Bar
                from .gate_reference import expectations
                from .gate_report import Laps
                from .verify import gate_providers, gate_units, run_gate
                from .verify_draft import PROPOSING_PRECISIONS, propose

                bar = Bar("verify", gate_units(cfg, kv_graph=kv_info["file"] is not None),
                          enabled=progress and sys.stderr.isatty())
                with stages("verify", heartbeat=not bar.enabled):
                    vprov = verify_providers(provider, log, w.folder, precision)
                    laps = Laps()  # the gate's phases, with the peak memory so far (manifest: parity -> phases)
                    laps("before the gate")
                    proposal = None
                    if precision in PROPOSING_PRECISIONS:  # before the reference loads: one model in memory
                        try:
                            proposal = propose(w.folder, cfg, gate_providers(vprov))
                        except Exception as e:  # only a speed-up: the gate's own checks will say what is wrong
                            log(f"  the artifact proposed no tokens ({type(e).__name__}); the reference decodes alone")
                        gc.collect()
                        laps("artifact proposes greedy and sampled tokens")
                    lm = load_reference(folder, key_map, overrides)
                    laps("reference: load")
                    expected = expectations(lm, w.folder, log, bar=bar, laps=laps, proposal=proposal)
                    del lm  # the reference's weights go before ONNX Runtime loads the artifact's copy
                    gc.collect()
                    laps("reference: freed")
                    report = run_gate(w.folder, expected, precision, vprov, log, bar=bar, laps=laps)
                    bar.close()
                log(report.table())
                parity, passed = report.to_dict(), report.passed
                verified = [report.provider] if passed else []
            with stages("manifest"):
                artifact.write_manifest(w, cfg=cfg, source_info=source_info, source=folder, lift_mode=lift_mode,
                                        precision=precision, opset=opset, providers_verified=verified, parity=parity,
                                        stages=stages.seconds, kv_graph=kv_info, quantization=quant_info,
                                        tokenizer=tok_manifest)
            if not passed:
                failed = w.keep_failed()
                bad = ", ".join(c["name"] for c in parity["checks"] if c["required"] and not c["passed"])
                raise ExportError(f"parity gate failed ({bad}); nothing was written to {out}. The failed artifact and "
                                  f"its report (manifest.json -> parity) are in {failed}")
            w.commit()
    except ExportError:
        raise
    except KeyboardInterrupt:
        raise
    except OSError as e:
        full = disk_full_error(e, e.filename or out)
        if full is not None:
            raise full from None
        raise ExportError(f"export failed writing {e.filename or out} ({type(e).__name__}: {e.strerror or e}); "
                          f"nothing was written to {out}. Rerun with --debug for the traceback") from e
    except Exception as e:
        raise ExportError(f"export failed in an unexpected place ({type(e).__name__}: {str(e).strip()[:300]}); "
                          f"nothing was written to {out}. Rerun with --debug for the traceback") from e
    log(f"[export] wrote {out} ({sum(stages.seconds.values()):.1f} s)")
    return out


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
