"""The token code ("lift", SPEC 1.1) as ONNX nodes: input_ids int64 [batch, seq] -> inputs_embeds.

Three graph modes compute the same numbers with different operator sets, because execution
providers differ in which integer operators they implement:

- `bitwise`: unsigned BitShift + BitwiseAnd (ORT has these on the CPU provider only);
- `arith`:   int64 Div / Mod by powers of two (every provider, CUDA included);
- `lookup`:  Gather from a constant table of the V recoded K-bit codes (uint16 when K <= 16, so the
             table costs V*K bits), then unpacked with int32 Div / Mod.
- `table`:   not a lift: Gather from a learned [V, d] input embedding table, for the paper's
             learned-table baseline (`input_table` checkpoints) only, so that it and the table-free
             model are exported and compared by one tool. The "no V x d table" invariant is waived
             for this mode alone, and the manifest says so.

Recoding c~ = (A c + b) mod 2 is a float MatMul with A^T, Add b, Mod 2: every intermediate is a
small integer (<= K + 1), so float32 is exact. No step holds a V x d constant: bitwise/arith carry
about K*K + K values, lookup V*K bits. Node names say which part of the lift they are
(`/model/embed/lift/bits/BitShift`, ...), so a profiler or a graph viewer shows where time goes.
About 400 lines: building, splicing, extracting and checking the lift belong together, since each
check reads the graph the builder wrote.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reference.config import CodeConfig
from runtime.interface import INPUT_IDS, INPUTS_EMBEDS, LIFT_MODES

from .maps import consumers, producers
PREFIX = "/model/embed/lift"
MIN_OPSET = {"bitwise": 18, "arith": 13, "lookup": 13, "table": 13}  # BitwiseAnd is opset 18; Unsqueeze axes-as-input 13
TABLE_MODE = "table"  # a learned input table: the baseline's input, never a table-free model's
EXPORT_MODES = (*LIFT_MODES, TABLE_MODE)  # what the exporter accepts; the SPEC lift modes plus the baseline's
TABLE_NAME = f"{PREFIX}/table/weight"


class LiftGraphError(ValueError):
    """A lift that cannot be built or spliced as asked; the message names the fix."""


class _Builder:
    """Collects nodes and initializers under PREFIX; tensor names follow `<node name>_output_0`."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, part: str, name: str, value: np.ndarray) -> str:
        full = f"{PREFIX}/{part}/{name}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), full))
        return full

    def op(self, part: str, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        name = f"{PREFIX}/{part}/{op_type}"
        n = sum(1 for node in self.nodes if node.name == name or node.name.startswith(name + "_"))
        if n:
            name = f"{name}_{n}"
        out = out or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out


def _shift_amounts(code: CodeConfig) -> np.ndarray:
    """Bit positions in code-vector order: position i holds bit i (lsb_first) or bit K-1-i."""
    s = np.arange(code.bits, dtype=np.int64)
    return s[::-1].copy() if code.bit_order == "msb_first" else s


def _bits_bitwise(g: _Builder, ids: str, code: CodeConfig) -> str:
    """(t >> s_i) & 1 with unsigned ints: ORT's BitShift takes unsigned types only."""
    utype, np_u = (TensorProto.UINT32, np.uint32) if code.bits <= 32 else (TensorProto.UINT64, np.uint64)
    u = g.op("bits", "Cast", [ids], to=utype)
    u = g.op("bits", "Unsqueeze", [u, g.const("bits", "axes", np.array([-1], np.int64))])
    sh = g.op("bits", "BitShift", [u, g.const("bits", "shifts", _shift_amounts(code).astype(np_u))], direction="RIGHT")
    bit = g.op("bits", "BitwiseAnd", [sh, g.const("bits", "one", np.array(1, np_u))])
    return g.op("bits", "Cast", [bit], to=TensorProto.FLOAT)


def _unpack_divmod(g: _Builder, x: str, powers: np.ndarray) -> str:
    """(x div 2^s_i) mod 2 in x's integer type, then float: exact, and CUDA has all three ops."""
    x = g.op("bits", "Unsqueeze", [x, g.const("bits", "axes", np.array([-1], np.int64))])
    q = g.op("bits", "Div", [x, g.const("bits", "powers", powers)])
    bit = g.op("bits", "Mod", [q, g.const("bits", "two", np.array(2, powers.dtype))], fmod=0)
    return g.op("bits", "Cast", [bit], to=TensorProto.FLOAT)


def _bits_arith(g: _Builder, ids: str, code: CodeConfig) -> str:
    if code.bits > 62:
        raise LiftGraphError(f"code.bits = {code.bits} does not fit int64 arithmetic; use at most 62 bits")
    return _unpack_divmod(g, ids, np.left_shift(np.int64(1), _shift_amounts(code)).astype(np.int64))


def _bits_lookup(g: _Builder, ids: str, code: CodeConfig, vocab_size: int) -> str:
    """Gather the recoded code of each id from a [V] table, then unpack in position order."""
    from reference.lift import recoded_codes

    if code.bits > 31:
        raise LiftGraphError(f"lookup mode stores codes as int32; code.bits = {code.bits} > 31, use --code arith")
    table = recoded_codes(code, vocab_size)
    table = table.astype(np.uint16) if code.bits <= 16 else table.astype(np.int32)
    codes = g.op("bits", "Gather", [g.const("bits", "code_table", table), ids], axis=0)
    if table.dtype != np.int32:
        codes = g.op("bits", "Cast", [codes], to=TensorProto.INT32)
    powers = np.left_shift(np.int32(1), np.arange(code.bits, dtype=np.int32)).astype(np.int32)
    return _unpack_divmod(g, codes, powers)


def _recode(g: _Builder, bits: str, code: CodeConfig) -> str:
    """(c A^T + b) mod 2 in float32: sums are integers <= K + 1, hence exact. Skipped for A = I, b = 0."""
    A = np.asarray(code.A, dtype=np.float32)
    b = np.asarray(code.b, dtype=np.float32)
    if np.array_equal(A, np.eye(code.bits, dtype=np.float32)) and not b.any():
        return bits
    x = g.op("recode", "MatMul", [bits, g.const("recode", "A_T", np.ascontiguousarray(A.T))])
    if b.any():
        x = g.op("recode", "Add", [x, g.const("recode", "b", b)])
    return g.op("recode", "Mod", [x, g.const("recode", "two", np.array(2.0, np.float32))], fmod=1)


def _values(g: _Builder, v: str, code: CodeConfig) -> str:
    """0/1 -> scale*{0,1} or scale*{-1,+1}; as v*(2s) - s, which is exact in float32."""
    s = np.float32(code.scale)
    if code.values == "plus_minus_one":
        v = g.op("values", "Mul", [v, g.const("values", "two_scale", np.array(2 * s, np.float32))])
        return g.op("values", "Sub", [v, g.const("values", "scale", np.array(s, np.float32))])
    if s != 1:
        v = g.op("values", "Mul", [v, g.const("values", "scale", np.array(s, np.float32))])
    return v


def _tile(g: _Builder, v: str, code: CodeConfig, width: int, out: str) -> str:
    """[B, S, K] -> [B, S, width]: repeat is Tile; interleave is Unsqueeze + Expand + Reshape."""
    K = code.bits
    reps = width // K
    if code.tiling == "repeat":
        return g.op("tile", "Tile", [v, g.const("tile", "repeats", np.array([1, 1, reps], np.int64))], out=out)
    v = g.op("tile", "Unsqueeze", [v, g.const("tile", "axes", np.array([-1], np.int64))])
    v = g.op("tile", "Expand", [v, g.const("tile", "expand_shape", np.array([1, 1, 1, reps], np.int64))])
    return g.op("tile", "Reshape", [v, g.const("tile", "shape", np.array([0, 0, width], np.int64))], out=out)


def _check(code: CodeConfig, width: int, mode: str, opset: int) -> None:
    if mode not in EXPORT_MODES:
        raise LiftGraphError(f"lift mode {mode!r} is not one of {EXPORT_MODES}")
    try:
        code.validate()
    except ValueError as e:
        raise LiftGraphError(str(e)) from None
    if width % code.bits:
        raise LiftGraphError(f"width {width} is not a multiple of code.bits {code.bits}; the code cannot tile it")
    if opset < MIN_OPSET[mode]:
        raise LiftGraphError(f"lift mode {mode!r} needs opset >= {MIN_OPSET[mode]} (got {opset}); pass a newer --opset")


def lift_nodes(code: CodeConfig, width: int, mode: str, opset: int, vocab_size: int | None = None,
               ids: str = INPUT_IDS, out: str = INPUTS_EMBEDS, table: onnx.TensorProto | None = None,
               ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The lift as (nodes, initializers) reading `ids` and writing `out`: what both entry points share.

    `table` (mode "table" only): the [V, width] input table, e.g. from `table_initializer`."""
    _check(code, width, mode, opset)
    V = vocab_size if vocab_size is not None else 1 << code.bits
    g = _Builder()
    if mode == TABLE_MODE:
        if table is None or list(table.dims) != [V, width]:
            got = None if table is None else list(table.dims)
            raise LiftGraphError(f"lift mode table needs the [{V}, {width}] input table (got {got}); "
                                 "only checkpoints with an input embedding table export in this mode")
        g.inits.append(table)
        g.op("table", "Gather", [table.name, ids], out=out, axis=0)
        return g.nodes, g.inits
    if mode == "bitwise":
        bits = _bits_bitwise(g, ids, code)
    elif mode == "arith":
        bits = _bits_arith(g, ids, code)
    else:
        bits = _bits_lookup(g, ids, code, V)
    if mode != "lookup":  # lookup's table already holds the recoded codes
        bits = _recode(g, bits, code)
    _tile(g, _values(g, bits, code), code, width, out)
    return g.nodes, g.inits


def _model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    ops = [helper.make_opsetid("", opset)]
    m = helper.make_model(graph, opset_imports=ops, producer_name="tablefree-onnx")
    m.ir_version = helper.find_min_ir_version_for(ops)  # oldest IR that has the opset: loads in older ORT
    return m


def build_lift_graph(code: CodeConfig, width: int, mode: str, opset: int,
                     vocab_size: int | None = None) -> onnx.ModelProto:
    """A standalone model input_ids int64 [batch, seq] -> inputs_embeds float32 [batch, seq, width].

    `vocab_size` sizes the lookup table (default 2**bits, i.e. every id the code can name).
    """
    nodes, inits = lift_nodes(code, width, mode, opset, vocab_size)
    graph = helper.make_graph(
        nodes, f"lift_{mode}",
        [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(INPUTS_EMBEDS, TensorProto.FLOAT, ["batch", "seq", width])],
        initializer=inits,
    )
    model = _model(graph, opset)
    onnx.checker.check_model(model)
    return model


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise LiftGraphError("the body model imports no default-domain opset; it is not a traced ONNX model")


def table_initializer(table: np.ndarray, data_path: str | Path) -> onnx.TensorProto:
    """The [V, d] float32 input table as an initializer whose bytes are appended to `data_path`
    (the body's external data file, 64-byte aligned), so model.onnx itself stays small."""
    data_path = Path(data_path)
    arr = np.ascontiguousarray(table, dtype=np.float32)
    with open(data_path, "ab") as f:
        pad = -f.tell() % 64
        f.write(b"\0" * pad)
        offset = f.tell()
        f.write(arr.tobytes())
    t = onnx.TensorProto()
    t.name, t.data_type = TABLE_NAME, TensorProto.FLOAT
    t.dims.extend(arr.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def attach_lift(body: onnx.ModelProto, code: CodeConfig, mode: str, vocab_size: int | None = None,
                table: onnx.TensorProto | None = None) -> onnx.ModelProto:
    """Replace the body's first input `inputs_embeds` [batch, seq, d] by `input_ids` int64 + the lift.

    Works on the graph only, in place and returned: the body may be loaded with
    `load_external_data=False`, its weights stay where they are. The other inputs and outputs keep
    their order; input_ids comes first, with the body's own batch / seq dimension names.
    """
    g = body.graph
    if not g.input or g.input[0].name != INPUTS_EMBEDS:
        first = g.input[0].name if g.input else None
        raise LiftGraphError(f"the body's first input is {first!r}, expected {INPUTS_EMBEDS!r}; trace the body on inputs_embeds")
    emb = g.input[0]
    dims = emb.type.tensor_type.shape.dim
    if len(dims) != 3 or not dims[2].HasField("dim_value"):
        raise LiftGraphError(f"{INPUTS_EMBEDS} must be [batch, seq, d] with a fixed d; got {onnx.helper.printable_value_info(emb)}")
    width = int(dims[2].dim_value)
    if any(i.name == INPUT_IDS for i in g.input):
        raise LiftGraphError(f"the body already has an input named {INPUT_IDS!r}")
    nodes, inits = lift_nodes(code, width, mode, _default_opset(body), vocab_size, table=table)
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    clash = sorted(taken & ({t.name for t in inits} | {o for n in nodes for o in n.output if o != INPUTS_EMBEDS}))
    if clash:
        raise LiftGraphError(f"the body already defines {clash[:3]}: it seems to have a lift attached already")

    ids = helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, None)
    for d in dims[:2]:
        nd = ids.type.tensor_type.shape.dim.add()
        nd.CopyFrom(d)
    rest = list(g.input[1:])
    del g.input[:]
    g.input.extend([ids, *rest])
    body_nodes = list(g.node)
    del g.node[:]
    g.node.extend([*nodes, *body_nodes])  # lift first keeps the graph topologically sorted
    g.initializer.extend(inits)
    g.value_info.append(helper.make_tensor_value_info(INPUTS_EMBEDS, TensorProto.FLOAT, [dims[0].dim_param or None,
                                                                                       dims[1].dim_param or None, width]))
    return body


# -- reading the lift back out of a full model ---------------------------------------------------

def lift_cone(model: onnx.ModelProto, out: str = INPUTS_EMBEDS) -> tuple[list[onnx.NodeProto], set[str]]:
    """Every node that `out` depends on (topological order) and the graph inputs it reads."""
    g = model.graph
    prod = producers(g)
    if out not in prod:
        raise LiftGraphError(f"no node produces {out!r}; this model has no attached lift (or a pass renamed it)")
    graph_inputs = {i.name for i in g.input}
    seen_nodes: set[int] = set()
    inputs: set[str] = set()
    todo = deque([out])
    while todo:
        t = todo.popleft()
        if t in graph_inputs:
            inputs.add(t)
        n = prod.get(t)
        if n is None or id(n) in seen_nodes:
            continue
        seen_nodes.add(id(n))
        todo.extend(i for i in n.input if i)
    nodes = [n for n in g.node if id(n) in seen_nodes]
    return nodes, inputs


def extract_lift(model: onnx.ModelProto, base_dir: str | Path | None = None, out: str = INPUTS_EMBEDS) -> onnx.ModelProto:
    """The lift of a full model as a standalone input_ids -> inputs_embeds model (for the exhaustive check).

    Copies only the lift's own constants; if the model was loaded without external data, those
    tensors that live in the data file are read from `base_dir` (the model's folder).
    """
    g = model.graph
    nodes, inputs = lift_cone(model, out)
    if inputs != {INPUT_IDS}:
        raise LiftGraphError(f"{out!r} depends on graph inputs {sorted(inputs)}, expected only {INPUT_IDS!r}")
    needed = {i for n in nodes for i in n.input}
    inits = []
    for t in g.initializer:
        if t.name in needed:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            if c.data_location == TensorProto.EXTERNAL:
                if base_dir is None:
                    raise LiftGraphError(f"lift constant {t.name!r} is in external data; pass base_dir (the model folder)")
                onnx.external_data_helper.load_external_data_for_tensor(c, str(base_dir))
                c.data_location = TensorProto.DEFAULT
                del c.external_data[:]
            inits.append(c)
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    width = None
    for vi in list(g.value_info) + list(g.output):
        if vi.name == out and len(vi.type.tensor_type.shape.dim) == 3:
            width = vi.type.tensor_type.shape.dim[2].dim_value or None
    graph = helper.make_graph(
        copies, "lift_extracted",
        [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "seq", width])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="tablefree-onnx")
    m.ir_version = model.ir_version
    return m


# -- the "no V x d table" invariant ------------------------------------------------------------

_PASS_THROUGH = {"Cast", "Identity", "DequantizeLinear", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
_GATHERS = {"Gather", "GatherElements", "GatherND"}


def _constants(graph: onnx.GraphProto) -> dict[str, tuple[list[int], int]]:
    """name -> (shape, bits per element) for initializers and Constant nodes, without reading data."""
    out: dict[str, tuple[list[int], int]] = {}
    for t in graph.initializer:
        out[t.name] = (list(t.dims), _elem_bits(t.data_type))
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[n.output[0]] = (list(a.t.dims), _elem_bits(a.t.data_type))
    return out


def _elem_bits(data_type: int) -> int:
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        return 4
    try:
        return 8 * helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:  # string and exotic types: count as a byte, they are never tables here
        return 8


def lift_budget_bits(vocab_size: int, bits: int) -> int:
    """What the input interface may cost in constants: V*K bits (stored as uint16/int32) plus slack.

    The slack (32-bit values for K*K + 8K + 64 small constants) covers A^T, b, shifts and shapes.
    """
    storage = 16 if bits <= 16 else 32
    return vocab_size * storage + 32 * (bits * bits + 8 * bits + 64)


def check_no_vocab_table(model: onnx.ModelProto, vocab_size: int, width: int, bits: int | None = None) -> dict:
    """Raise LiftGraphError if the graph holds an input embedding table; return a small report.

    An embedding table is a constant with a vocab_size dimension and at least V*width/2 elements
    that a Gather reads (through casts, dequantization or reshapes), or any constant of the lift's
    own subgraph beyond the lift budget. The output projection (lm_head, [d, V] read by MatMul) is
    legitimate and is not flagged. Reads shapes only: safe on models loaded without external data.
    """
    from reference.config import code_width

    K = bits if bits is not None else code_width(vocab_size)
    g = model.graph
    consts = _constants(g)
    readers = consumers(g)

    def gathered(name: str, depth: int = 0) -> bool:  # read as the data input (0) of a Gather, maybe via casts
        for n in readers.get(name, []):
            if n.input[0] != name:
                continue
            if n.op_type in _GATHERS:
                return True
            if n.op_type in _PASS_THROUGH and depth < 8 and any(gathered(o, depth + 1) for o in n.output):
                return True
        return False

    for name, (shape, _) in consts.items():
        numel = int(np.prod(shape)) if shape else 1
        if vocab_size in shape and numel >= vocab_size * width // 2 and gathered(name):
            raise LiftGraphError(
                f"constant {name!r} {shape} is a vocabulary table read by Gather: the graph has an input "
                "embedding table; the input must be the lift (export with --code bitwise|arith|lookup)"
            )
    report = {"lift_constant_bits": None, "lift_budget_bits": lift_budget_bits(vocab_size, K)}
    try:
        nodes, _ = lift_cone(model)
    except LiftGraphError:
        return report  # a body without the lift attached: nothing more to check
    used = {i for n in nodes for i in n.input} | {o for n in nodes for o in n.output}
    sizes = {nm: (int(np.prod(s)) if s else 1) * b for nm, (s, b) in consts.items() if nm in used}
    total = sum(sizes.values())
    report["lift_constant_bits"] = total
    if total > report["lift_budget_bits"]:
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        raise LiftGraphError(
            f"the lift's constants hold {total} bits, over the budget of {report['lift_budget_bits']} "
            f"(V*K bits plus small constants); largest: {top}. The graph computes the input from a table"
        )
    return report


__all__ = [
    "EXPORT_MODES",
    "TABLE_MODE",
    "table_initializer",
    "LiftGraphError",
    "build_lift_graph",
    "attach_lift",
    "lift_nodes",
    "lift_cone",
    "extract_lift",
    "check_no_vocab_table",
    "lift_budget_bits",
]
