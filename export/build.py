"""`build()`: a checkpoint folder (or hub id) -> a verified artifact folder, in named, timed stages.

Stages: check arguments, load, trace, graph passes, lift, precision, save, verify, manifest. All
cheap argument checks come first so a bad invocation fails in well under a second. The artifact
is assembled in a temporary sibling of `out` and renamed into place only when the gate passed.
"""
from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.interface import DATA_FILE, KV_MODEL_FILE, MODEL_FILE, PRECISIONS

from .errors import ExportError
from .trace import DEFAULT_OPSET

PROVIDERS = ("cpu", "cuda")
OPSET_RANGE = (18, 23)  # LayerNormalization needs >= 17; onnxruntime 1.31 runs up to 23
CONVENTION_FIELDS = ("bit_order", "values", "tiling", "scale")  # code fields a user may override
# set only by the --trust-remote-code search (export/remote.py BLOCK_FIELDS)
BLOCK_FIELDS = ("norm_type", "rope_pairing", "hidden_act", "rotary_dim", "rope_theta", "parallel_residual",
                "parallel_norms")
INT_BLOCK_SIZE = 128  # MatMulNBits block for int8 (accuracy level 4: int8 compute)


class Stages:
    """Prints `stage ... s` lines and keeps the timings for the manifest; a heartbeat for long stages."""

    def __init__(self, log: Callable[[str], None], heartbeat_s: float = 15.0):
        self.log, self.heartbeat_s, self.seconds = log, heartbeat_s, {}

    @contextmanager
    def __call__(self, name: str, heartbeat: bool = True) -> Iterator[None]:
        """`heartbeat=False` where a progress bar already shows the stage moving."""
        t0 = time.perf_counter()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                self.log(f"  ... {name} still running ({time.perf_counter() - t0:.0f} s)")

        if heartbeat:
            threading.Thread(target=beat, daemon=True).start()
        try:
            yield
        finally:
            done.set()
            self.seconds[name] = time.perf_counter() - t0
        self.log(f"[export] {name:<10} {self.seconds[name]:7.2f} s")


def default_out(model_name: str, code: str, precision: str) -> Path:
    return Path("artifacts") / f"{model_name}-{code}-{precision}"


def check_arguments(out: Path, code: str, precision: str, provider: str, opset: int, force: bool,
                    trust_remote_code: bool, overrides: dict) -> None:
    """Everything that can be refused without reading a weight."""
    from graphs.lift import EXPORT_MODES

    if code not in EXPORT_MODES:
        raise ExportError(f"--code {code}: unknown lift mode; choose one of {', '.join(EXPORT_MODES)}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision}: unknown; choose one of {', '.join(PRECISIONS)}")
    if provider not in PROVIDERS:
        raise ExportError(f"--provider {provider}: unknown; choose cpu or cuda")
    if code == "bitwise" and provider == "cuda":
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
    if path is None or isinstance(path, dict):
        return path
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ExportError(f"--key-map {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"--key-map {path}: not a readable JSON object ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"--key-map {path}: expected a JSON object {{\"their.tensor.name\": \"our.name\"}}")
    return data


def apply_overrides(cfg, overrides: dict) -> None:
    """Convention overrides (CLI flags, or what --trust-remote-code found) onto a ModelConfig, in place."""
    for key in CONVENTION_FIELDS:
        if overrides.get(key) is not None:
            setattr(cfg.code, key, float(overrides[key]) if key == "scale" else overrides[key])
    for key in BLOCK_FIELDS:
        if overrides.get(key) is not None:
            setattr(cfg, key, overrides[key])


def table_mode(cfg, code: str, out: Path, folder: Path, precision: str, log: Callable[[str], None]) -> tuple[str, Path]:
    """A checkpoint with an input embedding table exports in lift mode table, and only it does."""
    from graphs.lift import TABLE_MODE

    if cfg.input_table and code != TABLE_MODE:
        log(f"[export] {folder.name} has an input embedding table [{cfg.vocab_size}, {cfg.hidden_size}] (a learned-table "
            f"model, not table-free): exporting with lift mode {TABLE_MODE} instead of {code}")
        if out == default_out(folder.name, code, precision):
            out = default_out(folder.name, TABLE_MODE, precision)
        return TABLE_MODE, out
    if code == TABLE_MODE and not cfg.input_table:
        raise ExportError(f"--code {TABLE_MODE}: {folder} has no input embedding table (embed_tokens.weight / wte.weight "
                          "[V, d]); a table-free checkpoint exports with --code bitwise, arith or lookup")
    return code, out


def note_folder_code(folder: Path, log: Callable[[str], None]) -> None:
    """Say so when a folder ships model code that this build does not run (SPEC 2: only on request)."""
    from .remote import folder_auto_map

    if folder_auto_map(folder):
        log(f"[export] note: {folder.name} ships its own model code (auto_map in config.json); it was not run. "
            "Pass --trust-remote-code to check the reference against it")


def load_reference(folder: Path, key_map: dict | None, overrides: dict):
    """The checkpoint as the fp32 reference model, with any lift convention overrides applied.

    Built on the meta device and filled with `assign=True`, so the weights exist once in memory.
    """
    import torch

    from reference.checkpoint import CheckpointError, load_checkpoint
    from reference.config import ConfigError
    from reference.model import TableFreeLM

    try:
        cfg, sd = load_checkpoint(folder, key_map=key_map)
        apply_overrides(cfg, overrides)
        if "code.A" in sd:
            cfg.code.A = sd["code.A"].numpy()
        if "code.b" in sd:
            cfg.code.b = sd["code.b"].numpy()
        cfg.validate()
        with torch.device("meta"):
            lm = TableFreeLM(cfg)
        sd.setdefault("code.A", torch.as_tensor(cfg.code.A, dtype=torch.uint8))
        sd.setdefault("code.b", torch.as_tensor(cfg.code.b, dtype=torch.uint8))
        lm.load_state_dict(sd, strict=True, assign=True)
    except (CheckpointError, ConfigError) as e:
        raise ExportError(str(e)) from None
    except FileNotFoundError as e:
        raise ExportError(f"{folder}: {e}") from None
    except RuntimeError as e:  # load_state_dict: shapes that disagree with the config
        first = str(e).strip().splitlines()
        raise ExportError(f"{folder}: the weights do not fit config.json ({' '.join(first[:3])[:300]}); fix config.json") from None
    return lm.eval()


def export_graph(lm, work: Path, mode: str, opset: int, stages: Stages, lift_code=None) -> Path:
    """Trace, optimise, name, save with external data, splice the lift in; returns work/model.onnx.

    `lift_code` replaces the model's own code in the spliced lift: only tests use it, to prove the
    gate catches a graph whose lift differs from the reference.
    """
    import onnx
    import onnx_ir as ir

    from graphs.lift import TABLE_MODE, attach_lift, check_no_vocab_table, table_initializer
    from graphs.optimize import add_logits_to_keep, fuse_rotary, remove_dead

    from .passes import name_nodes, name_weights, optimize
    from .trace import trace_body

    work.mkdir(parents=True, exist_ok=True)
    path = work / MODEL_FILE
    with stages("trace"):
        body = trace_body(lm, opset)
    with stages("passes"):
        optimize(body)
        name_nodes(body)
        name_weights(body)
    with stages("save"):
        ir.save(body, path, external_data=DATA_FILE)
        del body
    with stages("lift"):
        proto = onnx.load(str(path), load_external_data=False)
        table = None  # the learned-table baseline's input table, appended to the weights file
        if mode == TABLE_MODE:
            table = table_initializer(lm.embed_tokens.weight.detach().numpy(), work / DATA_FILE)
        proto = attach_lift(proto, lift_code if lift_code is not None else lm.cfg.code, mode, lm.cfg.vocab_size,
                            table=table)
        if mode != TABLE_MODE:  # the invariant is waived for the baseline's table only (manifest: lift)
            check_no_vocab_table(proto, lm.cfg.vocab_size, lm.cfg.hidden_size)
        add_logits_to_keep(proto)  # prompts skip the vocabulary head on all but the last position
        if lm.cfg.rope_pairing == "rotate_half" and lm.cfg.rope_dim == lm.cfg.head_size:  # whole-head RoPE only
            cfg = lm.cfg
            fuse_rotary(proto, cfg.num_attention_heads, cfg.head_size, cfg.rope_theta, cfg.max_position_embeddings)
        remove_dead(proto.graph)  # what the passes above left unread (ORT warns about each at load)
        onnx.save(proto, str(path))
        onnx.checker.check_model(str(path))
    return path


def _export_child(conn, folder: Path, key_map: dict | None, overrides: dict, work: Path, mode: str, opset: int,
                  lift_code) -> None:
    """Body of the export process: load, trace, passes, save; stage lines and the result go to `conn`."""
    try:
        stages = Stages(lambda msg: conn.send(("log", msg)))
        lm = load_reference(folder, key_map, overrides)
        path = export_graph(lm, work, mode, opset, stages, lift_code=lift_code)
        conn.send(("ok", str(path), stages.seconds))
    except ExportError as e:
        conn.send(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which owns the error handling
        conn.send(("crash", f"{type(e).__name__}: {str(e).strip()[:300]}", traceback.format_exc()))
    finally:
        conn.close()


def export_isolated(folder: Path, key_map: dict | None, overrides: dict, work: Path, mode: str, opset: int,
                    stages: Stages, lift_code=None) -> Path:
    """`export_graph` in a spawned child process.

    Why: tracing the 0.5B model leaves about 0.7x its weight bytes of native memory behind that no
    release from Python returns (measured: RSS 2.65 GB with the model and every large Python object
    gone; benchmarks/RESULTS.md). A child gives all of it back when it exits, so the parity gate's
    ONNX Runtime session does not stack on top of it.
    """
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_export_child, args=(send, folder, key_map, overrides, work, mode, opset, lift_code),
                        daemon=True)
    child.start()
    send.close()
    result = None
    while True:
        try:
            msg = receive.recv()
        except EOFError:
            break
        if msg[0] == "log":
            stages.log(msg[1])
        else:
            result = msg
    child.join()
    if result is None:
        raise ExportError(f"the export process died (exit code {child.exitcode}) before it finished; if it ran out of "
                          "memory, close other programs or export on a machine with more RAM")
    if result[0] == "error":
        raise ExportError(result[1])
    if result[0] == "crash":
        raise RuntimeError(f"{result[1]}\n{result[2]}")
    stages.seconds.update(result[2])
    return Path(result[1])


def convert_precision(src: Path, dst_dir: Path, precision: str) -> None:
    """fp32 graph -> the requested precision in dst_dir (model.onnx + model.onnx.data)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / MODEL_FILE
    if precision == "fp32":
        os.replace(src, dst)
        os.replace(src.parent / DATA_FILE, dst_dir / DATA_FILE)
        return
    from graphs import quantize

    if precision == "fp16":
        quantize.to_fp16(src, dst)
    elif precision == "int8":
        # weight-only 8-bit MatMulNBits, block 128, int8 compute: 52 tok/s decode on the full model
        # against 45 for dynamic QUInt8 MatMulInteger (benchmarks/RESULTS.md)
        quantize.quantize_nbits(src, dst, bits=8, block_size=INT_BLOCK_SIZE)
    else:
        # block 32, asymmetric, 8-bit head: the fastest setting that meets the int4 floors on the full
        # model (block 128 symmetric: 86 tok/s but top-1 0.63 / KL 0.37 / ppl x1.48; benchmarks/RESULTS.md)
        quantize.quantize_nbits(src, dst, bits=4, block_size=32, is_symmetric=False, head_bits=8)
    if not (dst_dir / DATA_FILE).is_file():
        raise ExportError(f"{precision} conversion wrote no {DATA_FILE} beside {dst}; this is a bug in graphs.quantize")


def write_kv(folder: Path, log: Callable[[str], None]) -> dict:
    """The shared-cache decoder graph beside model.onnx (graphs/gqa.py), or a note why there is none.

    Optional by design: the artifact is complete without it (SPEC 3 is model.onnx); the runtime
    uses it for generation because a decode step then writes one cache position instead of
    copying the whole cache (benchmarks/RESULTS.md).
    """
    from graphs.gqa import GQAError, write_kv_graph

    try:
        write_kv_graph(folder)
    except GQAError as e:
        log(f"[export] note: no {KV_MODEL_FILE} ({e}); the runtime serves every call with {MODEL_FILE}")
        return {"file": None, "reason": str(e)}
    return {"file": KV_MODEL_FILE, "cache": "one [batch, heads, max_len, head_size] buffer per layer, past == present",
            "op": "com.microsoft.GroupQueryAttention", "padding": "right"}


def verify_providers(provider: str, log: Callable[[str], None]) -> str:
    """The provider the gate runs on: cuda when asked and installed, else cpu with a warning."""
    if provider != "cuda":
        return "cpu"
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return "cuda"
    log("warning: CUDAExecutionProvider is not installed here (onnxruntime CPU build); the parity gate runs on "
        "the CPU provider - run it on a CUDA machine with onnxruntime-gpu to verify there")
    return "cpu"


def build(model: str | os.PathLike | None, out: str | os.PathLike | None = None, code: str = "bitwise",
          precision: str = "fp32", provider: str = "cpu", opset: int | None = None, force: bool = False,
          verify: bool = True, key_map: str | os.PathLike | dict | None = None, trust_remote_code: bool = False,
          log: Callable[[str], None] = print, *, bit_order: str | None = None, values: str | None = None,
          tiling: str | None = None, scale: float | None = None, progress: bool = False, kv_graph: bool = True,
          _lift_code=None) -> Path:
    """Export `model` to a verified artifact folder and return its path; raises ExportError.

    `progress` draws a bar on stderr for the parity gate when stderr is a terminal (the CLI sets it).
    `kv_graph` adds model.kv.onnx, the shared-cache decoder graph (checked by the same gate).
    """
    from .hub import resolve_source

    opset = DEFAULT_OPSET if opset is None else int(opset)
    overrides = {"bit_order": bit_order, "values": values, "tiling": tiling, "scale": scale}
    stages = Stages(log)
    if out is not None:  # refuse a bad --out before touching the network or any weight
        check_arguments(Path(out), code, precision, provider, opset, force, trust_remote_code, overrides)
    with stages("load"):
        folder, source_info = resolve_source(model, with_code=trust_remote_code)
        out = Path(out) if out is not None else default_out(folder.name, code, precision)
        check_arguments(out, code, precision, provider, opset, force, trust_remote_code, overrides)
        key_map = read_key_map(key_map)
        lm = load_reference(folder, key_map, overrides)  # validates everything before the long stages
        code, table_out = table_mode(lm.cfg, code, out, folder, precision, log)
        if table_out != out:
            out = table_out
            check_arguments(out, code, precision, provider, opset, force, trust_remote_code, overrides)
        if trust_remote_code:
            from .remote import check_remote

            check = check_remote(folder, lm, log)
            overrides.update(check.conventions)  # the trace child and the gate build the same reference
            apply_overrides(lm.cfg, overrides)
            source_info["remote_code"] = check.to_dict()
        else:
            note_folder_code(folder, log)
    cfg = lm.cfg
    del lm  # the trace runs in a child process and the gate reloads the reference (export_isolated)
    log(f"[export] model {folder} (V {cfg.vocab_size}, d {cfg.hidden_size}, {cfg.num_hidden_layers} layers) "
        f"-> {out} [{code}, {precision}, opset {opset}]")
    out = out.absolute()
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    work = out.with_name(f".{out.name}.work-{os.getpid()}")
    for p in (staging, work):
        shutil.rmtree(p, ignore_errors=True)
    try:
        fp32 = export_isolated(folder, key_map, overrides, work, code, opset, stages, lift_code=_lift_code)
        with stages("precision"):
            convert_precision(fp32, staging, precision)
        with stages("files"):
            from . import artifact

            artifact.write_config(staging, cfg)
            artifact.write_generation_config(staging, cfg, folder)
            artifact.copy_tokenizer(staging, folder)
            artifact.write_genai_config(staging, cfg, provider)
        kv_info = {"file": None, "reason": "--no-kv-graph"}
        if kv_graph and cfg.rope_dim != cfg.head_size:  # the kv graph's attention op rotates whole heads
            kv_info = {"file": None, "reason": f"partial rotary (rotary_dim {cfg.rope_dim} of head size {cfg.head_size})"}
            log(f"[export] note: no {KV_MODEL_FILE} ({kv_info['reason']}); the runtime serves every call with {MODEL_FILE}")
        elif kv_graph:
            with stages("kv graph"):
                kv_info = write_kv(staging, log)
        parity, verified, passed = {"skipped": "--no-verify"}, [], True
        if verify:
            from .progress import Bar
            from .verify import expectations, gate_units, run_gate

            bar = Bar("verify", gate_units(cfg, kv_graph=kv_info["file"] is not None),
                      enabled=progress and sys.stderr.isatty())
            with stages("verify", heartbeat=not bar.enabled):
                vprov = verify_providers(provider, log)
                lm = load_reference(folder, key_map, overrides)
                expected = expectations(lm, staging, log, bar=bar)
                del lm  # the reference's weights go before ONNX Runtime loads the artifact's copy
                gc.collect()
                report = run_gate(staging, expected, precision, vprov, log, bar=bar)
                bar.close()
            log(report.table())
            parity, passed = report.to_dict(), report.passed
            verified = [report.provider] if passed else []
        with stages("manifest"):
            artifact.write_manifest(staging, cfg=cfg, source_info=source_info, source=folder, mode=code,
                                    precision=precision, opset=opset, providers_verified=verified, parity=parity,
                                    stages=stages.seconds, kv_graph=kv_info)
        if not passed:
            failed = artifact.keep_failed(staging, out)
            bad = ", ".join(c["name"] for c in parity["checks"] if c["required"] and not c["passed"])
            raise ExportError(f"parity gate failed ({bad}); nothing was written to {out}. The failed artifact and its "
                              f"report (manifest.json -> parity) are in {failed}")
        artifact.move_into_place(staging, out)
    except ExportError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise ExportError(f"export failed in an unexpected place ({type(e).__name__}: {str(e).strip()[:300]}); "
                          f"nothing was written to {out}. Rerun with --debug for the traceback") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    log(f"[export] wrote {out} ({sum(stages.seconds.values()):.1f} s)")
    return out


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
