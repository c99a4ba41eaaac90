"""Who writes and who reads each tensor of a protobuf graph: the one place these maps are built.

Every protobuf pass (graphs/optimize.py, gqa.py, quantize.py, lift.py) walks the graph through
them. Each map is a snapshot: a pass that edits the graph rebuilds it after the edit.
"""
from __future__ import annotations

import onnx


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """tensor name -> the node that outputs it (graph inputs and initializers have none)."""
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """tensor name -> the nodes that read it, in graph order (a node reading it twice is listed twice)."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                users.setdefault(i, []).append(n)
    return users


__all__ = ["producers", "consumers"]
