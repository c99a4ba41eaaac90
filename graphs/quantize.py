"""Precision passes on a saved fp32 model (model file + external data) -> a new model file.

All three use ONNX Runtime's own tools, so the result is what ORT's kernels expect:
- `to_fp16`: `onnxruntime.transformers.float16`, with the usual fp16 overflow spots kept in fp32
  (LayerNorm, Softmax, the residual adds, the norm statistics) and the lift kept exact;
- `quantize_int8`: dynamic quantization of MatMul weights (DynamicQuantizeLinear + MatInteger),
  QUInt8 by default (signed int8 without reduce_range is wrong on AVX2 CPUs without VNNI);
- `quantize_int4`: weight-only MatMulNBits (block-wise, symmetric), lm_head included.
The lift's nodes are never quantized or converted: its recoding MatMul must stay exact.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto

from .lift import LIFT_TENSOR, PREFIX, LiftGraphError, lift_cone

# Ops kept in fp32 by to_fp16: normalization and softmax overflow or lose too much in fp16; the
# RMSNorm statistics (Pow, ReduceMean, Sqrt, Reciprocal) overflow when activations exceed ~256.
FP32_OPS = [
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal",
]


def _no_external_refs_left(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer
            if t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data")]


def save_with_external_data(model: onnx.ModelProto, path: str | Path, data_name: str | None = None,
                            base_dir: str | Path | None = None, size_threshold: int = 1024) -> Path:
    """Write `path` + `data_name` (default `<path name>.data`) via a temp folder and renames.

    A reader never sees a half-written pair. Tensors still in some other data file (a model loaded
    with `load_external_data=False`) are read from `base_dir` first. The model's raw data moves
    out to the file: afterwards the in-memory proto points at the saved data.
    """
    path = Path(path)
    data_name = data_name or f"{path.name}.data"
    missing = _no_external_refs_left(model)
    if missing:
        if base_dir is None:
            raise ValueError(f"{len(missing)} tensors (e.g. {missing[0]!r}) are not loaded; pass base_dir "
                             "(the folder of their data file) or load the model with its external data")
        onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(model, tmp / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=size_threshold)
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def lift_node_names(model: onnx.ModelProto) -> list[str]:
    """Names of the lift's nodes (by name prefix, and the cone of inputs_embeds when present)."""
    names = {n.name for n in model.graph.node if n.name.startswith(PREFIX + "/")}
    try:
        names |= {n.name for n in lift_cone(model, LIFT_TENSOR)[0]}
    except LiftGraphError:
        pass
    return sorted(n for n in names if n)


def _load_light(src: Path) -> onnx.ModelProto:
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such model file; export the fp32 model first")
    return onnx.load(src, load_external_data=False)


def _hidden_size(model: onnx.ModelProto) -> int | None:
    for vi in [*model.graph.value_info, *model.graph.input]:
        if vi.name == LIFT_TENSOR:
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


def to_fp16(src: str | Path, dst: str | Path, kv_fp16: bool = True, keep_fp32_ops: list[str] | None = None) -> dict:
    """fp16 weights and compute for CUDA; LayerNorm, Softmax, residual adds and the lift stay fp32.

    `kv_fp16`: past/present tensors become fp16 (half the cache traffic); logits stay fp32 either
    way. The runtime reads the input types from the session. Returns what was kept in fp32.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src, dst = Path(src), Path(dst)
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
    save_with_external_data(model, dst)
    return {"precision": "fp16", "round_trip_casts_removed": dropped, "fp32_ops": ops, "fp32_nodes": blocked_nodes, "fp32_io": keep_io,
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
    cast = next((n for n in g.node if LIFT_TENSOR in n.output), None)
    if cast is None or _cast_to(cast) != TensorProto.FLOAT16:
        return
    src = cast.input[0]
    half = LIFT_TENSOR + "_fp16"
    _rename_input(model, LIFT_TENSOR, half)
    cast.output[0] = half
    for n in g.node:
        for k, o in enumerate(n.output):
            if o == src:
                n.output[k] = LIFT_TENSOR
    _rename_input(model, src, LIFT_TENSOR)
    for v in g.value_info:
        if v.name == LIFT_TENSOR:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
            v.name = half


def _drop_round_trip_casts(model: onnx.ModelProto) -> int:
    """Cast(fp32 -> fp16) followed by Cast(fp16 -> fp32) rounds a value the fp32 nodes meant to keep
    exact (the residual stream between two fp32 adds, the lift): feed the original fp32 tensor instead."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    types.update({n.output[0]: _cast_to(n) for n in g.node if n.op_type == "Cast"})
    types[LIFT_TENSOR] = TensorProto.FLOAT
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


def quantize_int8(src: str | Path, dst: str | Path, weight_type: str = "QUInt8", reduce_range: bool = False,
                  per_channel: bool = False) -> dict:
    """Dynamic int8 MatMul (lm_head included): weights int8, activations quantized per call.

    weight_type "QUInt8", or "QInt8" with reduce_range=True; plain QInt8 saturates on AVX2 CPUs
    without VNNI and gives wrong results there.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if weight_type == "QInt8" and not reduce_range:
        logging.getLogger(__name__).warning("QInt8 without reduce_range overflows on CPUs without VNNI")
    exclude = lift_node_names(_load_light(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8.", dir=dst.parent) as tmp:
        out = Path(tmp) / dst.name
        quantize_dynamic(src, out, op_types_to_quantize=["MatMul"], weight_type=QuantType[weight_type],
                         reduce_range=reduce_range, per_channel=per_channel, nodes_to_exclude=exclude,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        save_with_external_data(onnx.load(out), dst)
    return {"precision": "int8", "weight_type": weight_type, "reduce_range": reduce_range,
            "per_channel": per_channel, "excluded_nodes": exclude}


def _head_nodes(model: onnx.ModelProto) -> list[str]:
    """The vocabulary head's MatMul node(s) (one, or its column blocks joined by a Concat)."""
    from .optimize import head_matmuls

    return [n.name for n in head_matmuls(model.graph)]


def quantize_nbits(src: str | Path, dst: str | Path, bits: int = 4, block_size: int = 32, accuracy_level: int = 4,
                   is_symmetric: bool = True, head_bits: int | None = None) -> dict:
    """Weight-only block-wise MatMulNBits (bits 4 or 8) for every MatMul with a constant weight, lm_head included.

    accuracy_level 4 computes with int8 activations (fastest on CPU); 0/1 dequantize to fp32.
    head_bits: the vocabulary head at another width (int4 body + 8-bit head: the head's error
    lands straight in the logits, and it is 14% of the weights).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src, dst = Path(src), Path(dst)
    model = _load_light(src)
    exclude = lift_node_names(model)
    head = _head_nodes(model) if head_bits not in (None, bits) else []
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
    out.graph.ClearField("value_info")  # stale fp32 shapes of replaced nodes confuse later passes
    save_with_external_data(out, dst)
    return {"precision": f"int{bits}", "method": "MatMulNBits", "bits": bits, "head_bits": head_bits or bits,
            "block_size": block_size, "accuracy_level": accuracy_level, "is_symmetric": is_symmetric,
            "excluded_nodes": exclude}


def quantize_int4(src: str | Path, dst: str | Path, block_size: int = 32, accuracy_level: int = 4,
                  is_symmetric: bool = True) -> dict:
    """Weight-only 4-bit MatMulNBits for every MatMul with a constant weight, lm_head included."""
    return quantize_nbits(src, dst, 4, block_size, accuracy_level, is_symmetric)


__all__ = ["save_with_external_data", "lift_node_names", "residual_adds", "to_fp16", "quantize_int8",
           "quantize_int4", "quantize_nbits", "FP32_OPS"]
