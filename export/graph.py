"""The fp32 graph: the reference model loaded from the checkpoint, traced, passed through graphs/,
with the lift spliced in, and saved to the build's work folder - in a child process.

Why a child: tracing the 0.5B model leaves about 0.7x its weight bytes of native memory behind
that no release from Python returns (benchmarks/RESULTS.md); a child gives all of it back when it
exits. The child dies with its parent (even on SIGKILL), and the parent ends the child when it is
interrupted, so no trace outlives the build that asked for it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from runtime.interface import DATA_FILE, MODEL_FILE

from .errors import ExportError
from .progress import Stages
from .remote import BLOCK_FIELDS
from .writer import disk_full_error

CONVENTION_FIELDS = ("bit_order", "values", "tiling", "scale")  # code fields a user may override


def apply_overrides(cfg, overrides: dict) -> None:
    """Convention overrides (CLI flags, or what --trust-remote-code found) onto a ModelConfig, in place."""
    for key in CONVENTION_FIELDS:
        if overrides.get(key) is not None:
            setattr(cfg.code, key, float(overrides[key]) if key == "scale" else overrides[key])
    for key in BLOCK_FIELDS:  # set only by the --trust-remote-code search
        if overrides.get(key) is not None:
            setattr(cfg, key, overrides[key])


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


def export_graph(lm, work: Path, lift_mode: str, opset: int, stages: Stages, lift_code=None) -> Path:
    """Trace, optimise, name, save with external data, splice the lift in; returns work/model.onnx.

    `lift_code` replaces the model's own code in the spliced lift: only tests use it, to prove the
    gate catches a graph whose lift differs from the reference.
    """
    import onnx
    import onnx_ir as ir

    from graphs.lift import TABLE_MODE, attach_lift, check_no_vocab_table, table_initializer
    from graphs.optimize import add_logits_to_keep, fuse_rotary, name_dims, remove_dead
    from graphs.passes import name_nodes, name_weights, optimize
    from graphs.rmsnorm import FUSED_OP, check_model_file, count_norms, fuse_rmsnorm
    from graphs.shape_free import static_reshapes

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
        if lift_mode == TABLE_MODE:
            table = table_initializer(lm.embed_tokens.weight.detach().numpy(), work / DATA_FILE)
        proto = attach_lift(proto, lift_code if lift_code is not None else lm.cfg.code, lift_mode, lm.cfg.vocab_size,
                            table=table)
        if lift_mode != TABLE_MODE:  # the invariant is waived for the baseline's table only (manifest: lift)
            check_no_vocab_table(proto, lm.cfg.vocab_size, lm.cfg.hidden_size)
        if lm.cfg.norm_type == "rmsnorm":  # one node a norm; the passes below look for the final one
            want = count_norms(lm.cfg.num_hidden_layers, lm.cfg.has_ln2)
            fused = fuse_rmsnorm(proto, lm.cfg.hidden_size)
            if fused != want:
                raise ExportError(f"the RMSNorm fusion matched {fused} of the model's {want} norms in the traced graph "
                                  f"(x * rsqrt(mean(x^2) + eps) * weight -> {FUSED_OP}); the tracer's output changed "
                                  "shape (torch version?): export with the torch version in pyproject.toml")
        add_logits_to_keep(proto)  # prompts skip the vocabulary head on all but the last position
        # decode speed depends on the fusion: a miss is an error, not a slow artifact (whole-head RoPE only)
        if lm.cfg.rope_pairing == "rotate_half" and lm.cfg.rope_dim == lm.cfg.head_size:
            cfg = lm.cfg
            fused = fuse_rotary(proto, cfg.num_attention_heads, cfg.head_size, cfg.rope_theta, cfg.max_position_embeddings)
            if fused != 2 * cfg.num_hidden_layers:
                raise ExportError(f"the rotary fusion matched {fused} of the {2 * cfg.num_hidden_layers} rotate-half "
                                  "RoPE patterns (q and k of each layer) in the traced graph; the tracer's output changed "
                                  "shape (torch version?): export with the torch version in pyproject.toml")
        static_reshapes(proto)  # reshape targets without run-time Shape nodes (CUDA would run those on the CPU)
        remove_dead(proto.graph)  # what the passes above left unread (ORT warns about each at load)
        name_dims(proto)
        onnx.save(proto, str(path))
        check_model_file(path)  # onnx.checker, told about ORT's SimplifiedLayerNormalization
    return path


def die_with_parent(parent_pid: int) -> None:
    """End this (trace) process when its parent ends, even by SIGKILL: prctl(PR_SET_PDEATHSIG) on
    Linux, else a thread that polls the parent's pid."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG = 1
                if os.getppid() != parent_pid:  # the parent died before the call took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _export_child(conn, parent_pid: int, folder: Path, key_map: dict | None, overrides: dict, work: Path,
                  lift_mode: str, opset: int, lift_code) -> None:
    """Body of the export process: load, trace, passes, save; stage lines and the result go to `conn`."""
    die_with_parent(parent_pid)
    try:
        stages = Stages(lambda msg: conn.send(("log", msg)))
        lm = load_reference(folder, key_map, overrides)
        path = export_graph(lm, work, lift_mode, opset, stages, lift_code=lift_code)
        conn.send(("ok", str(path), stages.seconds))
    except ExportError as e:
        conn.send(("error", str(e)))
    except OSError as e:
        full = disk_full_error(e, e.filename or work / MODEL_FILE)
        if full is None:
            conn.send(("crash", f"{type(e).__name__}: {str(e).strip()[:300]}", traceback.format_exc()))
        else:
            conn.send(("error", str(full)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which owns the error handling
        conn.send(("crash", f"{type(e).__name__}: {str(e).strip()[:300]}", traceback.format_exc()))
    finally:
        conn.close()


def export_isolated(folder: Path, key_map: dict | None, overrides: dict, work: Path, lift_mode: str, opset: int,
                    stages: Stages, lift_code=None) -> Path:
    """`export_graph` in a spawned child process.

    Why: tracing the 0.5B model leaves about 0.7x its weight bytes of native memory behind that no
    release from Python returns (measured: RSS 2.65 GB with the model and every large Python object
    gone; benchmarks/RESULTS.md). A child gives all of it back when it exits, so the parity gate's
    ONNX Runtime session does not stack on top of it.
    """
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_export_child, daemon=True,
                        args=(send, os.getpid(), folder, key_map, overrides, work, lift_mode, opset, lift_code))
    child.start()
    send.close()
    result = None
    try:
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
    finally:  # interrupted (Ctrl-C, SIGTERM): the child must not write on into a folder being removed
        if child.is_alive():
            child.terminate()
            child.join(5)
            if child.is_alive():
                child.kill()
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
