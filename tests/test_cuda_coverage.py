"""CUDA readiness without a GPU: each artifact kind the README runs on CUDA, node by node.

The oracle is ONNX Runtime itself, not this project: its CUDA provider's registered kernels
(docs/OperatorKernels.md, committed as graphs/cuda_kernels.json with the commit and version it came
from, named in every assertion), its CPU-placement rule for shape computations
(fallback_cpu_capability.cc) and the GroupQueryAttention / MatMulNBits limits read from its
source (graphs/cuda_check.py cites the files). Runs on the CPU, no skip.

Kinds (README: `--code arith` or `lookup`; fp32/fp16/int8/int4): model.onnx of each, and for fp16
the shared-cache graphs too (the runtime opens model.kv.onnx on CUDA only when its cache is fp16;
the float32 kv graphs are shown to need exactly that, their GroupQueryAttention being float).
"""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from graphs.cuda_check import check_model, table_source

# slow (six --provider cuda builds, ~2 min on 2 cores): CI runs it in `make test-slow`; every --provider cuda
# build runs the same check in its gate
pytestmark = pytest.mark.slow

KINDS = [("arith", "fp32"), ("lookup", "fp32"), ("arith", "fp16"), ("lookup", "fp16"), ("arith", "int8"),
         ("arith", "int4")]
SOURCE = table_source()


@pytest.fixture(scope="module")
def cuda_builds(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint exported with --provider cuda in every kind (the gate runs for arith fp16 only: speed)."""
    from export.build import build

    root = tmp_path_factory.mktemp("cuda-kinds")
    logs: dict[tuple[str, str], list[str]] = {}
    out = {}
    for mode, precision in KINDS:
        lines = logs.setdefault((mode, precision), [])
        out[(mode, precision)] = build(tiny_ckpt, root / f"{mode}-{precision}", lift_mode=mode, precision=precision,
                                       provider="cuda", verify=(mode, precision) == ("arith", "fp16"), log=lines.append)
    return out, logs


@pytest.mark.parametrize("kind", KINDS, ids=[f"{m}-{p}" for m, p in KINDS])
def test_model_onnx_runs_wholly_on_cuda(cuda_builds, kind):
    folder = cuda_builds[0][kind]
    rep = check_model(folder / "model.onnx")
    assert rep.ok(), f"model.onnx ({kind}) by ONNX Runtime's CUDA table [{SOURCE}]: {rep.problems()[:5]}"
    assert "ai.onnx.Shape" not in rep.placed, f"run-time shape computation left in model.onnx ({kind})"


@pytest.mark.parametrize("mode", ["arith", "lookup"])
def test_fp16_kv_and_genai_graphs_run_on_cuda(cuda_builds, mode):
    folder = cuda_builds[0][(mode, "fp16")]
    kv = check_model(folder / "model.kv.onnx")
    assert kv.ok(), f"model.kv.onnx (fp16) by ONNX Runtime's CUDA table [{SOURCE}]: {kv.problems()[:5]}"
    assert kv.placed.get("com.microsoft.GroupQueryAttention") == 2  # one per layer: q, k, v in one op
    genai = check_model(folder / "model.genai.onnx")
    # genai keeps CPU fallback: only its total_sequence_length (a CPU input of the kernel) is computed there
    assert genai.ok(allow_cpu=True), f"model.genai.onnx by [{SOURCE}]: {genai.problems(allow_cpu=True)[:5]}"
    assert all(n.split()[0] in ("Gather", "Cast") for n in genai.cpu_nodes), genai.cpu_nodes


def test_fp32_kv_graph_needs_model_onnx_on_cuda(cuda_builds):
    """Why the runtime takes model.onnx of non-fp16 artifacts on CUDA: ORT's CUDA GQA is float16/bfloat16."""
    rep = check_model(cuda_builds[0][("arith", "fp32")] / "model.kv.onnx")
    assert rep.missing and all("GroupQueryAttention" in p and "tensor(float)" in p for p in rep.missing), rep.missing


def test_cuda_int4_block_runs_the_one_row_kernel(cuda_builds):
    import json

    folder = cuda_builds[0][("arith", "int4")]
    q = json.loads((folder / "manifest.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["block_size"] in (16, 32, 64, 128)
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for n in m.graph.node:  # the CPU build's block 256 is what ORT's CUDA 4-bit GEMV throws on
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "block_size":
                    a.i = 256
    rep = check_model(m)
    assert rep.limits and all("block_size 256" in p for p in rep.limits), rep.limits


def test_the_gate_ran_the_check(cuda_builds):
    lines = cuda_builds[1][("arith", "fp16")]
    line = next((x for x in lines if "CUDA readiness" in x), None)
    assert line and "model.kv.onnx" in line and "1.25.0" in line, lines[-5:]


def test_gate_refuses_a_graph_cuda_cannot_run(tmp_path, tiny_ckpt, monkeypatch):
    """An int4 build whose block the CUDA kernel throws on is refused in one line naming the node."""
    import export.build as B
    from export.errors import ExportError

    monkeypatch.setattr(B, "CUDA_INT4_MAX_BLOCK", 256)
    monkeypatch.setitem(B.INT4_SETTINGS, "gptq", dict(B.INT4_SETTINGS["gptq"], block_size=256))
    with pytest.raises(ExportError) as e:
        B.build(tiny_ckpt, tmp_path / "a", lift_mode="arith", precision="int4", provider="cuda", log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and "MatMulNBits" in msg and "block_size 256" in msg and "--provider cuda" in msg


def _graph(nodes, inputs, outputs, inits=(), opset=21) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_checker_sees_a_missing_kernel_and_shape_nodes_on_the_cpu():
    """Hand-written graphs whose CUDA fate ORT's source decides: BitShift has no CUDA kernel; a
    Shape -> Gather -> Concat chain goes to the CPU; the same reshape with a constant does not."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT64, [4])
    y = helper.make_tensor_value_info("y", TensorProto.UINT64, [4])
    rep = check_model(_graph([helper.make_node("BitShift", ["x", "x"], ["y"], direction="LEFT")], [x], [y]))
    assert rep.missing and "no CUDA kernel" in rep.missing[0]

    f = helper.make_tensor_value_info("f", TensorProto.FLOAT, ["b", 6])
    o = helper.make_tensor_value_info("o", TensorProto.FLOAT, ["b", 2, 3])
    idx = helper.make_tensor("idx", TensorProto.INT64, [1], [0])
    tail = helper.make_tensor("tail", TensorProto.INT64, [2], [2, 3])
    nodes = [helper.make_node("Shape", ["f"], ["s"]), helper.make_node("Gather", ["s", "idx"], ["b0"], axis=0),
             helper.make_node("Concat", ["b0", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["f", "target"], ["o"])]
    rep = check_model(_graph(nodes, [f], [o], [idx, tail]))
    assert [n.split()[0] for n in rep.cpu_nodes] == ["Gather", "Concat"] and not rep.missing
    static = helper.make_tensor("static", TensorProto.INT64, [3], [0, 2, 3])
    rep = check_model(_graph([helper.make_node("Reshape", ["f", "static"], ["o"])], [f], [o], [static]))
    assert rep.ok(), rep.problems()


def test_runtime_refuses_a_cpu_int4_block_on_cuda(monkeypatch):
    """The runtime says so in one line before opening a session (the kernel would throw at decode)."""
    from runtime.sessions import cuda_block_problem

    why = cuda_block_problem({"precision": "int4", "quantization": {"bits": 4, "block_size": 256}})
    assert why and "\n" not in why and "block 256" in why and "--provider cuda" in why
    assert cuda_block_problem({"precision": "int4", "quantization": {"bits": 4, "block_size": 128}}) is None
    assert cuda_block_problem({"precision": "int8", "quantization": {"bits": 8, "block_size": 256}}) is None


# -- the second oracle: onnxruntime-gpu's own partitioner, run without a GPU (tests/cuda_probe) --

def _placements(models: list) -> dict:
    """ORT-GPU's "Node placements" for each model (placement.py in the cudaprobe venv, the stand-in
    device preloaded); a missing venv skips with its make target (fails under CI), like the front ends."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    venv = Path(os.environ.get("TABLEFREE_CUDAPROBE_VENV") or root / ".venvs" / "cudaprobe")
    lib = venv / "cudaprobe-lib"
    if not (venv / "bin" / "python").is_file() or not (lib / "libfake_cudart.so").is_file():
        msg = f"no cudaprobe venv at {venv}: run `make setup-cudaprobe`"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI must run the partitioner check")
        pytest.skip(msg)
    env = {**os.environ, "LD_PRELOAD": str(lib / "libfake_cudart.so"), "LD_LIBRARY_PATH": str(lib)}
    p = subprocess.run([str(venv / "bin" / "python"), str(root / "tests" / "cuda_probe" / "placement.py"),
                        *map(str, models)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _names(nodes: list[str]) -> set[str]:
    """"Op (name)" (ORT's log) and "Op name" (the checker) to the node names."""
    return {n.split(" ", 1)[1].strip("()") for n in nodes}


def test_ort_gpu_partitioner_agrees_with_the_checker(cuda_builds):
    """Every graph the checker clears, ORT-GPU's partitioner places wholly on CUDA; the genai graph's
    CPU nodes are the ones the checker names; the fp32 kv graph loses exactly its attention to the CPU."""
    builds = cuda_builds[0]
    models = [builds[k] / "model.onnx" for k in KINDS]
    models += [builds[(m, "fp16")] / g for m in ("arith", "lookup") for g in ("model.kv.onnx", "model.genai.onnx")]
    fp32_kv = builds[("arith", "fp32")] / "model.kv.onnx"
    got = _placements([*models, fp32_kv])
    version = next(iter(got.values()))["version"]
    for m in models:
        rep, placed = check_model(m), got[str(m)]
        where = f"{m.parent.name}/{m.name} [ORT-GPU {version} partitioner vs table {SOURCE}]"
        assert _names(placed["cpu_nodes"]) == _names(rep.cpu_nodes), where
        if m.name != "model.genai.onnx":
            assert list(placed["providers"]) == ["CUDAExecutionProvider"], f"{where}: {placed}"
    placed = got[str(fp32_kv)]
    assert {n.split()[0] for n in placed["cpu_nodes"]} == {"GroupQueryAttention"}, placed
    assert len(placed["cpu_nodes"]) == check_model(fp32_kv).placed["com.microsoft.GroupQueryAttention"]
