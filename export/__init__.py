"""The exporter: a table-free checkpoint folder -> a verified ONNX artifact folder (SPEC 3).

Entry points: `export.build.build(...)` and `python -m export build ...`.
"""
__version__ = "0.1.0"
