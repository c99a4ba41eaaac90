"""Does an ONNX graph run wholly on ONNX Runtime's CUDA provider? Checked without a GPU.

No GPU is lent to this project, so CUDA readiness is read from ONNX Runtime itself:

- kernels: graphs/cuda_kernels.json, the CUDAExecutionProvider section of ONNX Runtime's
  docs/OperatorKernels.md (generated from the registered kernels; `python -m graphs.cuda_table`
  regenerates it and its "source" names the commit and version). A node needs a kernel for its
  domain, op, the since-version its opset selects, and its input/output types.
- placement: ORT's GetCpuPreferredNodes (core/framework/fallback_cpu_capability.cc) moves to the
  CPU every node that consumes only CPU tensors (a Shape/Size output, small initializers, graph
  inputs) where the consuming kernel does not take that input in CPU memory. The runtime opens
  CUDA sessions with session.disable_cpu_ep_fallback=1, and then ORT refuses the session
  (inference_session.cc: "graph nodes that are assigned to the default CPU EP"): so in the graphs
  the runtime opens, any such node is an error.
- kernel limits read from source: GroupQueryAttention (contrib_ops/cuda/bert/group_query_attention.cc,
  contrib_ops/cpu/bert/group_query_attention_helper.h) and MatMulNBits
  (contrib_ops/cuda/quantization/matmul_nbits.cc, matmul_4bits.cu).

`check_model(path_or_proto)` returns a CudaReport; `python -m graphs.cuda_check FOLDER_OR_ONNX...`
prints it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import onnx
from onnx import helper

TABLE = Path(__file__).with_name("cuda_kernels.json")
INF = 2 ** 31 - 1

# Kernel memory placements from the CUDA provider's KernelDefBuilder calls (core/providers/cuda/...):
# outputs written to CPU memory, and inputs read from CPU memory (the node stays on CUDA).
CPU_OUTPUTS = {("ai.onnx", "Shape"): {0}, ("ai.onnx", "Size"): {0}}  # tensor/shape_op.cc, tensor/size.cc
CPU_INPUTS = {  # tensor/reshape.cc, slice.cc, tile.cc, unsqueeze.cc, squeeze.cc, expand.cc; generator/range.cc,
    ("ai.onnx", "Reshape"): {1}, ("ai.onnx", "Slice"): {1, 2, 3, 4}, ("ai.onnx", "Tile"): {1},  # constant_of_shape.cc;
    ("ai.onnx", "Unsqueeze"): {1}, ("ai.onnx", "Squeeze"): {1}, ("ai.onnx", "Expand"): {1},  # reduction_ops.cc
    ("ai.onnx", "Range"): {0, 1, 2}, ("ai.onnx", "ConstantOfShape"): {0},
    **{("ai.onnx", op): {1} for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                       "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")},
    ("com.microsoft", "GroupQueryAttention"): {6},  # total_sequence_length (group_query_attention.cc)
}
HALF = {"tensor(float16)", "tensor(bfloat16)"}  # fallback_cpu_capability.cc never moves these to the CPU
SMALL_INITIALIZER = 100  # kSmallInitializerThreshold, elements
MATMUL4_ONE_ROW_BLOCKS = (16, 32, 64, 128)  # matmul_4bits.cu TryMatMul4Bits: other blocks ORT_THROW when m == 1


@dataclass
class CudaReport:
    """What would stop the graph on CUDA: `missing` (no kernel), `cpu_nodes` (forced to the CPU),
    `limits` (a kernel's own rules); `placed` counts nodes per (domain, op)."""
    model: str
    source: str
    missing: list[str] = field(default_factory=list)
    cpu_nodes: list[str] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)
    placed: dict[str, int] = field(default_factory=dict)

    def problems(self, allow_cpu: bool = False) -> list[str]:
        cpu = [] if allow_cpu else [f"{n}: placed on the CPU by ONNX Runtime (it consumes only CPU tensors: "
                                    "run-time shape computation); refused with CPU fallback disabled"
                                    for n in self.cpu_nodes]
        return self.missing + cpu + self.limits

    def ok(self, allow_cpu: bool = False) -> bool:
        return not self.problems(allow_cpu)


@lru_cache(maxsize=1)
def table() -> dict:
    return json.loads(TABLE.read_text(encoding="utf-8"))


def table_source() -> str:
    """The ONNX Runtime version and commit the kernel table was read from (for messages)."""
    t = table()
    return f"ONNX Runtime {t['version']} ({t['commit'][:10]})"


def _dom(domain: str) -> str:
    return domain or "ai.onnx"


def _type_str(tp: onnx.TypeProto) -> str | None:
    if tp.HasField("tensor_type") and tp.tensor_type.elem_type:
        return f"tensor({helper.tensor_dtype_to_string(tp.tensor_type.elem_type).removeprefix('TensorProto.').lower()})"
    return None


def _known_types(model: onnx.ModelProto) -> dict[str, str]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    except Exception:  # contrib ops unknown to onnx: what it cannot infer stays unknown and is propagated below
        inferred = model
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = _type_str(vi.type)
        if t:
            types[vi.name] = t
    for init in g.initializer:
        types[init.name] = _type_str(helper.make_tensor_type_proto(init.data_type, None))
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = _type_str(helper.make_tensor_type_proto(a.t.data_type, None))
    return types


def _since(domain: str, op: str, opset: int) -> int:
    if domain == "ai.onnx":
        try:
            return onnx.defs.get_schema(op, opset, "").since_version
        except Exception:
            return opset
    return opset


def _kernel(domain: str, op: str, since: int) -> dict | None:
    for entry in table()["kernels"].get(domain, {}).get(op, []):
        if entry["since"] <= since <= entry["until"]:
            return entry
    return None


def _check_types(node: onnx.NodeProto, entry: dict, types: dict[str, str]) -> str | None:
    """Bind the kernel's type variables from the node's known types; fill unknown outputs."""
    best = None
    for alt in entry["params"]:
        bound: dict[str, str] = {}
        err = None
        for kind, names, formals in (("input", node.input, alt["inputs"]), ("output", node.output, alt["outputs"])):
            for i, name in enumerate(names):
                if not name or not formals:
                    continue
                formal, var = formals[min(i, len(formals) - 1)]  # past the end: a variadic last formal
                t = types.get(name)
                if t is None:
                    continue
                if var.startswith("tensor("):
                    allowed = [var]
                else:
                    allowed = entry["types"].get(var)
                    if var in bound and bound[var] != t:
                        err = f"{kind} {i} ({formal}) is {t} but {var} is already {bound[var]}"
                    bound[var] = t
                if allowed is not None and t not in allowed:
                    err = err or f"{kind} {i} ({formal}) is {t}; the CUDA kernel's {var} takes {', '.join(allowed)}"
        if err is None:
            for i, name in enumerate(node.output):
                if name and name not in types and alt["outputs"]:
                    var = alt["outputs"][min(i, len(alt["outputs"]) - 1)][1]
                    if var.startswith("tensor("):
                        types[name] = var
                    elif var in bound:
                        types[name] = bound[var]
            return None
        best = best or err
    return best


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dims(model: onnx.ModelProto, name: str) -> list | None:
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        if init.name == name:
            return list(init.dims)
    return None


def _gqa_limits(model: onnx.ModelProto, node: onnx.NodeProto, where: str) -> list[str]:
    out = []
    heads, kv_heads = _attr(node, "num_heads", 0), _attr(node, "kv_num_heads", 0)
    if not heads or not kv_heads or heads % kv_heads:
        out.append(f"{where}: num_heads {heads} must be a positive multiple of kv_num_heads {kv_heads}")
    past = _dims(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    head_size = past[3] if past and isinstance(past[3], int) else None
    if head_size is not None:
        if head_size % 8:
            out.append(f"{where}: head_size {head_size} must be a multiple of 8 (group_query_attention_helper.h)")
        if head_size > 1024:
            out.append(f"{where}: head_size {head_size} > 1024: neither flash (<= 256) nor memory-efficient "
                       "attention (<= 1024) runs it")
    if _attr(node, "do_rotary", 0) == 1:
        if len(node.input) < 9 or not node.input[7] or not node.input[8]:
            out.append(f"{where}: do_rotary=1 needs cos_cache and sin_cache")
        elif head_size is not None:
            cos = _dims(model, node.input[7])
            if head_size % 16:
                out.append(f"{where}: do_rotary=1 needs head_size % 16 == 0 (got {head_size})")
            if cos and isinstance(cos[1], int) and (cos[1] > head_size // 16 * 8 or cos[1] % 8):
                out.append(f"{where}: cos_cache dim 1 = {cos[1]} must be <= head_size/2 and a multiple of 8")
    if len(node.input) > 10 and node.input[10]:
        out.append(f"{where}: attention_bias is not supported by the CUDA kernel")
    if len(node.output) > 3 and node.output[3]:
        out.append(f"{where}: output_qk is not produced by the CUDA kernel")
    if past is not None and len(node.output) > 1:
        present = _dims(model, node.output[1])
        if present is not None and present[2] != past[2]:
            out.append(f"{where}: present_key dim 2 ({present[2]}) != past_key dim 2 ({past[2]}): past and present "
                       "cannot share one buffer (the CUDA kernel's fast decode needs past_present_share_buffer)")
    return out


def _nbits_limits(node: onnx.NodeProto, where: str) -> list[str]:
    out = []
    bits, block = _attr(node, "bits", 4), _attr(node, "block_size", 0)
    if bits == 4 and block not in MATMUL4_ONE_ROW_BLOCKS:
        out.append(f"{where}: 4-bit block_size {block}: the CUDA one-row kernel (every batch-1 decode step) takes "
                   f"{'/'.join(map(str, MATMUL4_ONE_ROW_BLOCKS))} and throws otherwise (matmul_4bits.cu)")
    if len(node.input) > 5 and node.input[5]:
        out.append(f"{where}: the bias input is not supported by the CUDA kernel (matmul_nbits.cc throws)")
    return out


def _cpu_preferred(model: onnx.ModelProto, types: dict[str, str]) -> list[str]:
    """GetCpuPreferredNodes (fallback_cpu_capability.cc) over a graph whose nodes all have CUDA kernels."""
    g = model.graph
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    small = {t.name for t in g.initializer if _numel(t.dims) <= SMALL_INITIALIZER}
    small |= {n.output[0] for n in g.node if n.op_type == "Constant"}  # ORT folds Constant nodes to initializers
    graph_inputs = {i.name for i in g.input}
    cpu_args: set[str] = set()
    candidates: list[int] = []
    for n in g.node:
        for idx in CPU_OUTPUTS.get((_dom(n.domain), n.op_type), ()):
            if idx < len(n.output):
                cpu_args.add(n.output[idx])
                candidates += consumers.get(n.output[idx], [])
    placed, seen = [], set()
    while candidates:
        candidates.sort()
        cur = candidates.pop(0)
        if cur in seen:
            continue
        seen.add(cur)
        n = g.node[cur]
        cpu_in = CPU_INPUTS.get((_dom(n.domain), n.op_type), set())
        to_cpu = True
        for i, name in enumerate(n.input):
            if not name:
                continue
            if types.get(name) in HALF:
                to_cpu = False
                break
            if name in small or name in graph_inputs:
                continue
            if name not in cpu_args or i in cpu_in:
                to_cpu = False
                break
        if to_cpu:
            placed.append(f"{n.op_type} {n.name or n.output[0]}")
            for out in n.output:
                cpu_args.add(out)
                candidates += consumers.get(out, [])
    return placed


def _numel(dims) -> int:
    size = 1
    for d in dims:
        size *= d
    return size


def check_model(model: str | Path | onnx.ModelProto) -> CudaReport:
    """Every node against the CUDA kernel table, ORT's CPU placement, and the kernels' own limits."""
    name = str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<model>")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    opsets = {_dom(o.domain): o.version for o in model.opset_import}
    types = _known_types(model)
    rep = CudaReport(model=name, source=table_source())
    for n in model.graph.node:
        dom = _dom(n.domain)
        where = f"{dom}.{n.op_type} '{n.name or n.output[0]}'"
        rep.placed[f"{dom}.{n.op_type}"] = rep.placed.get(f"{dom}.{n.op_type}", 0) + 1
        since = _since(dom, n.op_type, opsets.get(dom, 1))
        entry = _kernel(dom, n.op_type, since)
        if entry is None:
            rep.missing.append(f"{where}: no CUDA kernel for {dom}.{n.op_type} at opset {opsets.get(dom)} "
                               f"(since-version {since})")
            continue
        err = _check_types(n, entry, types)
        if err:
            rep.missing.append(f"{where}: {err}")
        if (dom, n.op_type) == ("com.microsoft", "GroupQueryAttention"):
            rep.limits += _gqa_limits(model, n, where)
        elif (dom, n.op_type) == ("com.microsoft", "MatMulNBits"):
            rep.limits += _nbits_limits(n, where)
    if not rep.missing:
        rep.cpu_nodes = _cpu_preferred(model, types)
    return rep


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    bad = 0
    print(f"CUDA kernel table: {table_source()}")
    for p in paths:
        for f in (sorted(p.glob("*.onnx")) if p.is_dir() else [p]):
            rep = check_model(f)
            allow_cpu = f.name == "model.genai.onnx"  # onnxruntime-genai opens it with CPU fallback allowed
            probs = rep.problems(allow_cpu)
            bad += bool(probs)
            print(f"{f}: {sum(rep.placed.values())} nodes, {'ok' if not probs else f'{len(probs)} problem(s)'}"
                  + (f"; on the CPU (fallback allowed): {', '.join(rep.cpu_nodes)}" if allow_cpu and rep.cpu_nodes else ""))
            for line in probs:
                print(f"  {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
