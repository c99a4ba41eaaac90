"""ONNX Runtime generation loop for exported table-free models. Needs numpy, onnxruntime and
tokenizers only; it never imports torch.

    import runtime
    model = runtime.load("artifacts/tiny")
    print(model.generate("Hello", max_new_tokens=32).text)
"""
from . import errors
from .errors import *  # noqa: F403 - the error classes are part of the public API
from .model import Model, load
from .results import ForwardOutput, GenerationResult, ScoreResult

__all__ = ["load", "Model", "GenerationResult", "ScoreResult", "ForwardOutput", *errors.__all__]
