"""Regenerate graphs/cuda_kernels.json from ONNX Runtime's docs/OperatorKernels.md.

Why a committed table: no GPU is lent to this project, so which of our nodes ONNX Runtime's CUDA
provider can run is read from the provider's own registry. ONNX Runtime writes that registry out as
docs/OperatorKernels.md (tools/python/gen_opkernel_doc.py walks the registered kernels); this script
keeps its CUDAExecutionProvider section as JSON: per (domain, op) the opset ranges, each with the
formal inputs/outputs (their type variable or fixed type) and the types each variable allows.

    python -m graphs.cuda_table OperatorKernels.md --version 1.25.0 --commit <sha> --source "<repo, date>" \
        > graphs/cuda_kernels.json
    python -m graphs.cuda_table OperatorKernels.md --compare-cpu   # the parser against the installed ORT

`--compare-cpu` parses the same file's CPUExecutionProvider section and compares it with the
kernels the installed onnxruntime registers (onnxruntime.capi._pybind_state.get_all_opkernel_def),
which tests the parser and says how far the file's version is from the installed one.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SECTION = re.compile(r"^## Operators implemented by (\w+)")
DOMAIN = re.compile(r"^\|\*\*Operator Domain:\*\* \*([\w.]+)\*")
PARAM = re.compile(r"\*(in|out)\* (\w+):\*\*([\w()]+)\*\*")
TYPES = re.compile(r"\*\*(\w+)\*\* = ([^<]+)")
INF = 2 ** 31 - 1


def _versions(cell: str) -> tuple[int, int]:
    cell = cell.strip()
    if cell.endswith("+"):
        return int(cell[:-1]), INF
    if cell.startswith("["):
        lo, hi = cell.strip("[]").split(",")
        return int(lo), int(hi)
    return int(cell), int(cell)


def _params(cell: str) -> list[dict]:
    """The formal parameter lists of one op; ORT writes alternatives (one per schema version) joined by 'or'."""
    out = []
    for alt in cell.split("<br><br>or<br><br>"):
        ins = [[n, t] for d, n, t in PARAM.findall(alt) if d == "in"]
        outs = [[n, t] for d, n, t in PARAM.findall(alt) if d == "out"]
        out.append({"inputs": ins, "outputs": outs})
    return out


def _types(cell: str) -> dict[str, list[str]]:
    return {var: [t.strip() for t in spec.split(",") if t.strip()] for var, spec in TYPES.findall(cell)}


def parse(md: str, provider: str) -> dict[str, dict[str, list[dict]]]:
    """{domain: {op: [{"since": lo, "until": hi, "params": [...], "types": {var: [types]}}]}} of one provider."""
    table: dict[str, dict[str, list[dict]]] = {}
    current = domain = op = None
    params: list[dict] = []
    for line in md.splitlines():
        m = SECTION.match(line)
        if m:
            current = m.group(1)
            continue
        if current != provider or not line.startswith("|"):
            continue
        m = DOMAIN.match(line)
        if m:
            domain = m.group(1)
            table.setdefault(domain, {})
            continue
        cells = line.split("|")[1:-1]
        if len(cells) != 4 or not re.match(r"^\[?\d", cells[2].strip()):
            continue  # the header and separator rows
        name, pcell, vcell, tcell = cells
        if name:
            op, params = name, _params(pcell)
        lo, hi = _versions(vcell)
        table[domain].setdefault(op, []).append({"since": lo, "until": hi, "params": params, "types": _types(tcell)})
    if not table:
        raise SystemExit(f"no '## Operators implemented by {provider}' section in the file")
    return table


def compare_cpu(md: str) -> int:
    """Differences between the file's CPU section and the installed onnxruntime's CPU kernels."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C

    doc = {(d or "ai.onnx", op, e["since"], e["until"]) for d, ops in parse(md, "CPUExecutionProvider").items()
           for op, es in ops.items() for e in es}
    have = set()
    for k in C.get_all_opkernel_def():
        lo, hi = k.version_range
        have.add((k.domain or "ai.onnx", k.op_name, lo, min(hi, INF)))
    only_doc, only_ort = sorted(doc - have), sorted(have - doc)
    print(f"file CPU entries {len(doc)}, onnxruntime {ort.__version__} CPU kernels {len(have)}; "
          f"{len(doc & have)} equal, {len(only_doc)} only in the file, {len(only_ort)} only in onnxruntime")
    for row in only_doc[:40]:
        print("  file only:", row)
    for row in only_ort[:40]:
        print("  ort only: ", row)
    return len(only_doc) + len(only_ort)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("md", type=Path, help="ONNX Runtime's docs/OperatorKernels.md")
    ap.add_argument("--source", default="", help="where the file came from (repository, commit, date)")
    ap.add_argument("--version", default="", help="the source's VERSION_NUMBER")
    ap.add_argument("--commit", default="", help="the source's commit")
    ap.add_argument("--provider", default="CUDAExecutionProvider")
    ap.add_argument("--compare-cpu", action="store_true")
    a = ap.parse_args(argv)
    md = a.md.read_text(encoding="utf-8")
    if a.compare_cpu:
        compare_cpu(md)
        return 0
    doc = {"source": a.source, "version": a.version, "commit": a.commit, "provider": a.provider, "generated_by": "python -m graphs.cuda_table",
           "kernels": parse(md, a.provider)}
    json.dump(doc, sys.stdout, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
