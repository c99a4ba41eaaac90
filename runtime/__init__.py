"""ONNX Runtime generation loop for exported table-free models. Needs numpy, onnxruntime and
tokenizers only; it never imports torch."""
