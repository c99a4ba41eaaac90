"""Graph passes, all of them: onnx-ir passes on the traced body (passes.py), the lift as ONNX nodes
(lift.py), protobuf passes on the saved graph (optimize.py: logits_to_keep, rotary fusion,
dimension names, dead code), precision (quantize.py) and the shared-cache graph (gqa.py); every
protobuf pass finds producers and readers through maps.py. Passes return models; writing the
artifact is export/writer.py's job."""
