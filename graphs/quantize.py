"""Precision passes on a saved fp32 model (model file + external data) -> a new in-memory model.

Both use ONNX Runtime's own tools, so the result is what ORT's kernels expect:
- `to_fp16`: `onnxruntime.transformers.float16`, with the usual fp16 overflow spots kept in fp32
  (LayerNorm, Softmax, the residual adds, the norm statistics) and the lift kept exact;
- `quantize_nbits`: weight-only block-wise MatMulNBits (int8 or int4 weights, lm_head included,
  optionally at its own width).
The lift's nodes are never quantized or converted: its recoding MatMul must stay exact. Each pass
returns (model with its weights in memory, a report); the caller writes it (export.writer).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import TensorProto

from runtime.interface import INPUTS_EMBEDS

from .lift import PREFIX, LiftGraphError, lift_cone
from .maps import producers

# Ops kept in fp32 by to_fp16: normalization and softmax overflow or lose too much in fp16; the
# RMSNorm statistics (Pow, ReduceMean, Sqrt, Reciprocal) overflow when activations exceed ~256.
FP32_OPS = [
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal",
]


def lift_node_names(model: onnx.ModelProto) -> list[str]:
    """Names of the lift's nodes (by name prefix, and the cone of inputs_embeds when present)."""
    names = {n.name for n in model.graph.node if n.name.startswith(PREFIX + "/")}
    try:
        names |= {n.name for n in lift_cone(model, INPUTS_EMBEDS)[0]}
    except LiftGraphError:
        pass
    return sorted(n for n in names if n)


def _load_light(src: Path) -> onnx.ModelProto:
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such model file; export the fp32 model first")
    return onnx.load(src, load_external_data=False)


def _hidden_size(model: onnx.ModelProto) -> int | None:
    for vi in [*model.graph.value_info, *model.graph.input]:
        if vi.name == INPUTS_EMBEDS:
            dims = vi.type.tensor_type.shape.dim
            return int(dims[-1].dim_value) if dims and dims[-1].dim_value else None
    return None


def residual_adds(model: onnx.ModelProto) -> list[str]:
    """Add nodes of the residual stream: two computed (non-constant) inputs, rank 3, last dim d.

    Needs shape-inferred value_info. Bias adds (one constant input) and the rank-4 attention-mask
    and rotary adds are not residual adds.
    """
    g = model.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    shapes = {vi.name: vi.type.tensor_type.shape.dim for vi in [*g.value_info, *g.output]}
    d = _hidden_size(model)
    out = []
    for n in g.node:
        if n.op_type != "Add" or any(i in consts for i in n.input):
            continue
        dims = shapes.get(n.output[0])
        if dims is None or len(dims) != 3:
            continue
        if d is None or dims[2].dim_value == d:
            out.append(n.name)
    return out


def to_fp16(src: str | Path, kv_fp16: bool = True,
            keep_fp32_ops: list[str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """fp16 weights and compute for CUDA; LayerNorm, Softmax, residual adds and the lift stay fp32.

    `kv_fp16`: past/present tensors become fp16 (half the cache traffic); logits stay fp32 either
    way. The runtime reads the input types from the session. Returns the model and what was kept
    in fp32.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src = Path(src)
    model = onnx.shape_inference.infer_shapes(_load_light(src))  # shapes only: weights stay on disk
    blocked_nodes = sorted(set(lift_node_names(model)) | set(residual_adds(model)))
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    float_io = [v.name for v in [*model.graph.input, *model.graph.output]
                if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    keep_io = [n for n in float_io if not (kv_fp16 and (n.startswith("past_key_values") or n.startswith("present")))]
    ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops if keep_fp32_ops is not None else FP32_OPS))
    model = convert_float_to_float16(model, keep_io_types=keep_io, op_block_list=ops,
                                     node_block_list=blocked_nodes, disable_shape_infer=True)
    # the converter retypes value_info of initializers it kept in fp32 (LayerNorm weights) to fp16;
    # such entries are redundant anyway, and wrong ones make onnx shape inference refuse the model
    inits = {t.name for t in model.graph.initializer}
    stale = [v for v in model.graph.value_info if v.name in inits]
    for v in stale:
        model.graph.value_info.remove(v)
    _restore_lift_output(model)
    dropped = _drop_round_trip_casts(model)
    return model, {"precision": "fp16", "round_trip_casts_removed": dropped, "fp32_ops": ops, "fp32_nodes": blocked_nodes, "fp32_io": keep_io,
            "kv_dtype": "float16" if kv_fp16 else "float32"}


def _cast_to(n: onnx.NodeProto) -> int | None:
    return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new


def _restore_lift_output(model: onnx.ModelProto) -> None:
    """The converter renames the lift's fp32 output and makes `inputs_embeds` an fp16 Cast of it;
    give the name back to the fp32 tensor so extract_lift and the exhaustive check still find it."""
    g = model.graph
    cast = next((n for n in g.node if INPUTS_EMBEDS in n.output), None)
    if cast is None or _cast_to(cast) != TensorProto.FLOAT16:
        return
    src = cast.input[0]
    half = INPUTS_EMBEDS + "_fp16"
    _rename_input(model, INPUTS_EMBEDS, half)
    cast.output[0] = half
    for n in g.node:
        for k, o in enumerate(n.output):
            if o == src:
                n.output[k] = INPUTS_EMBEDS
    _rename_input(model, src, INPUTS_EMBEDS)
    for v in g.value_info:
        if v.name == INPUTS_EMBEDS:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
            v.name = half


def _drop_round_trip_casts(model: onnx.ModelProto) -> int:
    """Cast(fp32 -> fp16) followed by Cast(fp16 -> fp32) rounds a value the fp32 nodes meant to keep
    exact (the residual stream between two fp32 adds, the lift): feed the original fp32 tensor instead."""
    g = model.graph
    prod = producers(g)
    outputs = {o.name for o in g.output}
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    types.update({n.output[0]: _cast_to(n) for n in g.node if n.op_type == "Cast"})
    types[INPUTS_EMBEDS] = TensorProto.FLOAT
    dropped = 0
    for n in list(g.node):
        if _cast_to(n) != TensorProto.FLOAT or n.output[0] in outputs:
            continue
        p = prod.get(n.input[0])
        if p is None or _cast_to(p) != TensorProto.FLOAT16 or types.get(p.input[0]) != TensorProto.FLOAT:
            continue  # only a float32 -> float16 -> float32 trip; an int -> fp16 -> fp32 one is real
        _rename_input(model, n.output[0], p.input[0])
        g.node.remove(n)
        dropped += 1
    used = {i for n in g.node for i in n.input} | outputs
    for n in list(g.node):  # fp16 casts nobody reads any more
        if n.op_type == "Cast" and not any(o in used for o in n.output):
            g.node.remove(n)
    return dropped


def _head_nodes(model: onnx.ModelProto) -> list[str]:
    """The vocabulary head's MatMul node(s) (one, or its column blocks joined by a Concat)."""
    from .optimize import head_matmuls

    return [n.name for n in head_matmuls(model.graph)]


QUANTIZERS = ("rtn", "gptq")


def quantize_nbits(src: str | Path, bits: int = 4, block_size: int = 32, accuracy_level: int = 4,
                   is_symmetric: bool = True, head_bits: int | None = None, quantizer: str = "rtn",
                   calibration: tuple[int, int] = (16, 128), log: Callable[[str], None] = lambda m: None,
                   hessians: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """Weight-only block-wise MatMulNBits (bits 4 or 8) for every MatMul with a constant weight, lm_head included.

    accuracy_level 4 computes with int8 activations (fastest on CPU); 0/1 dequantize to fp32.
    head_bits: the vocabulary head at another width (int4 body + 8-bit head: the head's error
    lands straight in the logits, and it is 14% of the weights).
    quantizer: "rtn" rounds each block to nearest; "gptq" (4-bit only) chooses the levels of the
    body's MatMuls against `calibration` = (sequences, tokens) sampled from this fp32 graph
    (graphs/gptq.py); the head stays round-to-nearest. Both write the same MatMulNBits nodes (ORT's
    quantizer makes them; GPTQ only replaces the packed weights, scales and zero points), so the
    session runs the same kernel. `hessians` ({MatMul input: X^T X}, from
    graphs.gptq.calibration_hessians) skips the calibration: a sweep computes them once.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer {quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
    if quantizer == "gptq" and bits != 4:
        raise ValueError(f"quantizer gptq writes 4-bit weights only (asked for {bits}); use rtn")
    src = Path(src)
    model = _load_light(src)
    exclude = lift_node_names(model)
    head = _head_nodes(model) if head_bits not in (None, bits) else []
    report: dict = {"quantizer": quantizer}
    hessians = hessians if (hessians and quantizer == "gptq") else {}
    own = not hessians  # computed here: each is freed once used (2.2 GB of them at full size)
    if quantizer == "gptq" and not hessians:
        from .gptq import calibration_hessians

        targets = _weight_matmuls(model, set(exclude) | set(head))
        inputs = sorted({n.input[0] for n in targets})
        t0 = time.perf_counter()
        log(f"  gptq: calibrating {len(targets)} MatMuls ({len(inputs)} inputs) on {calibration[0]} x "
            f"{calibration[1]} tokens sampled from the fp32 graph")
        hessians, seen = calibration_hessians(src, inputs, *calibration, log=log)
        report.update(calibration_tokens=seen, calibration_s=round(time.perf_counter() - t0, 1))
    skip = set(exclude) | set(head)
    # GPTQ reads each weight from the file as it goes, so the Hessians and the whole fp32 model are
    # never in memory together (the build's peak is the calibration; benchmarks/RESULTS.md)
    packed = (_gptq_weights(model, hessians, skip, block_size, is_symmetric, log, report, src.parent, free=own)
              if hessians else {})
    del hessians
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=is_symmetric,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude + head,
                             op_types_to_quantize=("MatMul",))
    q.process()
    out = q.model.model
    if head:
        q = MatMulNBitsQuantizer(out, bits=head_bits, block_size=block_size, is_symmetric=is_symmetric,
                                 accuracy_level=accuracy_level, nodes_to_include=head, nodes_to_exclude=exclude,
                                 op_types_to_quantize=("MatMul",))
        q.process()
        out = q.model.model
    if packed:
        _replace_packed(out, packed)
    out.graph.ClearField("value_info")  # stale fp32 shapes of replaced nodes confuse later passes
    report.update({"precision": f"int{bits}", "method": "MatMulNBits", "bits": bits, "head_bits": head_bits or bits,
                   "block_size": block_size, "accuracy_level": accuracy_level, "is_symmetric": is_symmetric,
                   "excluded_nodes": exclude})
    return out, report


def _weight_matmuls(model: onnx.ModelProto, skip: set[str]) -> list[onnx.NodeProto]:
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and n.name not in skip]


def _gptq_weights(model: onnx.ModelProto, hessians: dict, skip: set[str], block: int, symmetric: bool,
                  log: Callable[[str], None], report: dict, base_dir: Path, free: bool = False) -> dict[str, tuple]:
    """GPTQ of every MatMul weight (nodes in `skip` aside) whose input has a Hessian: {weight name:
    packed (B, scales, zero points)}.
    MatMuls sharing an input (q, k, v) are solved as one wider matrix: GPTQ treats output columns
    independently, so this is the same result in one pass."""
    import numpy as np
    from onnx import numpy_helper

    from .gptq import gptq, pack_nbits

    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list[str]] = {}
    for n in _weight_matmuls(model, skip):
        if n.input[0] in hessians and n.input[1] not in groups.get(n.input[0], []):
            groups.setdefault(n.input[0], []).append(n.input[1])
    out: dict[str, tuple] = {}
    t0 = time.perf_counter()
    for k, (inp, names) in enumerate(groups.items()):
        ws = [numpy_helper.to_array(inits[w], base_dir=str(base_dir)).astype(np.float32) for w in names]
        W = np.concatenate(ws, 1)
        H = hessians.pop(inp) if free else hessians[inp]
        K = W.shape[0]
        pad = -K % block  # ORT pads K to whole blocks with zero rows; so does GPTQ here (dead inputs)
        if pad:
            W = np.pad(W, ((0, pad), (0, 0)))
            H = np.pad(H, ((0, pad), (0, pad)))
        q, s, z = gptq(W, H, block, symmetric, lazy=max(128, block))
        col = 0
        for w, a in zip(names, ws):
            sl = slice(col, col + a.shape[1])
            out[w] = pack_nbits(q[:, sl], s[:, sl], z[:, sl], block)
            col += a.shape[1]
        if (k + 1) % 16 == 0 or k == len(groups) - 1:
            log(f"  gptq: {k + 1}/{len(groups)} inputs solved ({time.perf_counter() - t0:.0f} s)")
    report["gptq_s"] = round(time.perf_counter() - t0, 1)
    return out


def _replace_packed(model: onnx.ModelProto, packed: dict[str, tuple]) -> None:
    """Put GPTQ's packed weights into the MatMulNBits nodes ORT's quantizer made for the same
    weights (inputs `<w>_Q4`, `<w>_scales`, `<w>_zero_points`), checking shapes and dtypes match."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = set()
    for n in model.graph.node:
        if n.op_type != "MatMulNBits" or not n.input[1].endswith("_Q4"):
            continue
        w = n.input[1][: -len("_Q4")]
        if w not in packed:
            continue
        for name, arr in zip(n.input[1:4], packed[w]):
            old = inits[name]
            ref = numpy_helper.to_array(old)
            if ref.shape != arr.shape or ref.dtype != arr.dtype:
                raise ValueError(f"{name}: GPTQ packed {arr.dtype}{arr.shape}, ORT's node expects {ref.dtype}{ref.shape}")
            old.CopyFrom(numpy_helper.from_array(arr, name))
        done.add(w)
    missing = sorted(set(packed) - done)
    if missing:
        raise ValueError(f"GPTQ weights with no MatMulNBits node to go into: {', '.join(missing[:3])}")


__all__ = ["lift_node_names", "residual_adds", "to_fp16", "quantize_nbits", "FP32_OPS", "QUANTIZERS"]
